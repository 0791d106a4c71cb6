"""Random LoRAs in kohya's naming for ldm/sgm layers, and an applier with the contract of webui's
``networks.network_apply_weights``: back up each original weight once, restore it, add the wanted deltas
``multiplier * alpha / rank * up @ down``. webui runs its own; tests and benchmarks without webui use this one."""
from __future__ import annotations

import torch

from sd_webui_onediff.lora import backup_copies

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def lora_key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def make_lora(unet: torch.nn.Module, rank: int, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in unet.named_modules():
        if path.endswith(TARGETS) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out_features, in_features = module.weight.shape[:2]
            kernel = module.weight.shape[2:]
            key = lora_key(path)
            state[f"{key}.lora_down.weight"] = torch.randn((rank, in_features, *kernel), generator=generator) * scale
            state[f"{key}.lora_up.weight"] = torch.randn((out_features, rank, *[1] * len(kernel)), generator=generator) * scale
            state[f"{key}.alpha"] = torch.tensor(rank / 2)
    return state


def lora_delta(lora: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    down = lora[f"{key}.lora_down.weight"].to(weight.device, torch.float32)
    up = lora[f"{key}.lora_up.weight"].to(weight.device, torch.float32)
    scale = lora[f"{key}.alpha"].item() / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale


class KohyaApplier:
    """``fused``, ``touches``, ``fuse`` and ``back_up`` for ``lora.FusedLoras``; ``wanted``: ((name, multiplier), ...).
    Backups and restores as the webui adapter makes them (``lora.backup_copies``), deltas added as webui adds them."""

    def __init__(self, unet: torch.nn.Module, loras: dict[str, dict], backups_on_gpu: bool = False):
        self.loras = loras
        self.backups_on_gpu = backups_on_gpu
        self.backup_bytes = 0
        self.wanted: tuple = ()
        self.layers = []
        for path, module in unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.lora_key = lora_key(path)
                self.layers.append(module)

    def fused(self, layer) -> tuple:
        return getattr(layer, "fused_set", ())

    def touches(self, layer) -> bool:
        return any(f"{layer.lora_key}.alpha" in self.loras[name] for name, _ in self.wanted)

    def back_up(self, layers) -> None:
        fresh = [layer for layer in layers if not hasattr(layer, "original_weight")]
        weights = [layer.weight.detach() for layer in fresh]
        for layer, copy in zip(fresh, backup_copies(weights, layers[0].weight.device, on_device=self.backups_on_gpu)):
            layer.original_weight = copy
            self.backup_bytes += copy.numel() * copy.element_size()

    def fuse(self, layer) -> None:
        layer.weight.copy_(layer.original_weight, non_blocking=True)
        for name, multiplier in self.wanted:
            if f"{layer.lora_key}.alpha" in self.loras[name]:
                delta = multiplier * lora_delta(self.loras[name], layer.lora_key, layer.weight)
                layer.weight.copy_(layer.weight.float() + delta)
        layer.fused_set = self.wanted
