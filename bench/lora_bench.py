"""LoRA fuse time and speed with a LoRA fused, on the compiled UNet, with the original weights backed up in GPU memory
and in page-locked host memory (``lora.backup_copies``; webui's adapter picks one, see ``lora.fits_on_gpu``).

    python bench/lora_bench.py                 # full-size SDXL, rank 32, fp16, GPU
    python bench/lora_bench.py --tiny --device cpu

Fusing uses ``lora.FusedLoras`` with ``bench.loras.KohyaApplier`` (webui's contract and arithmetic: back up, restore,
fp32 ``up @ down`` added, LoRA tensors on the host as webui keeps them); inside webui the builtin Lora extension's own
function computes the deltas.
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import unet_bench  # noqa: E402
from sd_webui_onediff.bench.loras import KohyaApplier, make_lora  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet  # noqa: E402
from sd_webui_onediff.lora import FusedLoras  # noqa: E402

STEPS = (("fuse A (first: backups made)", (("A", 1.0),)), ("switch A -> B", (("B", 1.0),)),
         ("weight B 1.0 -> 0.5", (("B", 0.5),)), ("remove (restore)", ()), ("fuse A again", (("A", 1.0),)), ("remove", ()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    build, full, tiny, make_inputs, latent = unet_bench.CASES["sdxl"]
    config, latent = (tiny, 16) if args.tiny else (full, latent)
    unet = build(config, seed=1)
    loras = {"A": make_lora(unet, args.rank, seed=10, scale=0.05), "B": make_lora(unet, args.rank, seed=11, scale=0.05)}
    unet.to(device, dtype)
    inputs, kwargs = unet_bench.on_device(*make_inputs(config, batch=2, latent=latent), device)
    compiled = CompiledUNet(unet)
    autocast = unet_bench.fp16_autocast(device)

    def step():
        with torch.no_grad(), autocast:
            return compiled(*inputs, **kwargs)

    step()
    rows = [("-", "no LoRA", None, unet_bench.timed_ms(step, device, args.repeat))]
    backup_gib = {}
    for place, on_gpu in (("GPU", True), ("host, page-locked", False)):
        if on_gpu and device.type != "cuda":
            continue
        applier = KohyaApplier(unet, loras, backups_on_gpu=on_gpu)
        fused = FusedLoras(applier.layers, fused=applier.fused, fuse=applier.fuse, back_up=applier.back_up)
        compiled.before_call = lambda: fused.sync(applier.wanted, touches=applier.touches)
        for label, wanted in STEPS:
            applier.wanted = wanted
            step()
            rows.append((place, label, fused.seconds[-1], unet_bench.timed_ms(step, device, args.repeat)))
        backup_gib[place] = applier.backup_bytes / 2**30
        for layer in applier.layers:  # the next place starts from scratch, as after a checkpoint load
            layer.__dict__.pop("original_weight", None)
            layer.__dict__.pop("fused_set", None)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    layers = sum(f"{layer.lora_key}.alpha" in loras["A"] for layer in applier.layers)
    print(f"\ncard: {card}   torch: {torch.__version__}   SDXL{' tiny' if args.tiny else ''} UNet, rank {args.rank}, "
          f"{layers} layers, backups {', '.join(f'{place} {gib:.2f} GiB' for place, gib in backup_gib.items())}, "
          f"recompiles after the first compile: {compiled.stats.graphs_compiled - 1}")
    print("| backups | step | fuse ms | UNet call ms (batch 2) | it/s |\n|---|---|---|---|---|")
    for place, label, seconds, ms in rows:
        print(f"| {place} | {label} | {'-' if seconds is None else f'{seconds * 1e3:.0f}'} | {ms:.2f} | {1e3 / ms:.1f} |")


if __name__ == "__main__":
    main()
