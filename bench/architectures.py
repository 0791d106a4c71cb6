"""The real UNet architectures at full and tiny sizes, with sane random weights.

SD1.x/SD2.x are ldm's ``UNetModel`` and SDXL is sgm's, the classes webui runs (from its ``repositories/`` when they are on
``sys.path``; ldm also ships on PyPI as stable-diffusion-sdkit). Where sgm is not importable, SDXL is diffusers' SDXL
UNet (``addition_embed_type="text_time"``): the same network in another codebase.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

SD15_FULL = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                 channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                 context_dim=768, legacy=False, image_size=32)
SD15_TINY = dict(SD15_FULL, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                 num_heads=2, context_dim=64)
SD15_NARROW = dict(SD15_FULL, model_channels=32, num_heads=2, context_dim=64)
"""SD1.5's full topology (12 input blocks, 3 downsamplings, attention at 3 levels) at narrow width: ControlNet's model
guesser and its 13 control slots assume this topology."""
SD2_TINY = dict(SD15_TINY, num_heads=-1, num_head_channels=16, context_dim=96, use_linear_in_transformer=True)
SDXL_FULL = dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                 use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
                 context_dim=2048, spatial_transformer_attn_type="softmax-xformers", legacy=False)
SDXL_TINY = dict(SDXL_FULL, adm_in_channels=96, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
                 channel_mult=[1, 2], num_head_channels=16, transformer_depth=[1, 1], context_dim=80)


def _import_sgm_unet():
    """sgm's ``UNetModel`` without running ``sgm/__init__.py``, which imports the whole training stack (Lightning,
    open_clip, kornia) that the UNet does not use."""
    loaded = sys.modules.get("sgm.modules.diffusionmodules.openaimodel")
    if loaded is not None:
        return loaded.UNetModel
    spec = importlib.util.find_spec("sgm")
    if spec is None:
        return None
    root = Path(spec.origin).parent
    for name, path in (("sgm", root), ("sgm.modules", root / "modules"),
                       ("sgm.modules.diffusionmodules", root / "modules" / "diffusionmodules")):
        if name not in sys.modules:
            package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module("sgm.modules.diffusionmodules.openaimodel").UNetModel


def sgm_available() -> bool:
    return importlib.util.find_spec("sgm") is not None


def randomize(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, the zero-initialised output layers included (else every input gives the same
    output), scaled by fan-in so that activations stay O(1) and fp16 does not overflow."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.dim() > 1:
                noise = torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5
            elif "norm" in name and name.endswith("weight"):
                noise = 1 + 0.1 * torch.randn(parameter.shape, generator=generator)
            else:
                noise = 0.1 * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise)
    return unet.eval()


def sd_unet(config: dict, seed: int = 0, **overrides) -> torch.nn.Module:
    return randomize(sd_unet_structure(config, **overrides), seed)


def sd_unet_structure(config: dict, **overrides) -> torch.nn.Module:
    """The module as constructed (zero-initialised outputs); ``torch.device("meta")`` around it builds shapes only."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**{**config, **overrides}).eval()


def sdxl_unet(config: dict, seed: int = 0) -> torch.nn.Module:
    return randomize(sdxl_unet_structure(config), seed)


def sdxl_unet_structure(config: dict) -> torch.nn.Module:
    unet_class = _import_sgm_unet()
    if unet_class is not None:
        return unet_class(**config).eval()
    from diffusers import UNet2DConditionModel

    levels = range(len(config["channel_mult"]))
    with_attention = [2**level in config["attention_resolutions"] for level in levels]
    heads = [c * config["model_channels"] // config["num_head_channels"] for c in config["channel_mult"]]
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=config["num_res_blocks"],
        block_out_channels=[c * config["model_channels"] for c in config["channel_mult"]],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        transformer_layers_per_block=config["transformer_depth"], attention_head_dim=heads,
        cross_attention_dim=config["context_dim"], addition_embed_type="text_time",
        addition_time_embed_dim=_size_embedding_dim(config),
        projection_class_embeddings_input_dim=config["adm_in_channels"], use_linear_projection=True,
    ).eval()


def _size_embedding_dim(config: dict) -> int:
    """Diffusers' width per number of SDXL's 6 size/crop conditions: SDXL's 256 (6 x 256 of its 2816 ``y`` numbers,
    the rest is the pooled text embedding), 8 at tiny size."""
    return 256 if config["adm_in_channels"] == SDXL_FULL["adm_in_channels"] else 8


def sd_inputs(config: dict, batch: int = 2, latent: int = 16, tokens: int = 77, seed: int = 0, **overrides):
    """``(args, kwargs)`` as webui's ldm wrapper calls the UNet: ``x, timesteps, context=...``."""
    config = {**config, **overrides}
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], latent, latent, generator=generator)
    context = torch.randn(batch, tokens, config["context_dim"], generator=generator)
    return (x, torch.full((batch,), 500.0)), {"context": context}


def sdxl_inputs(config: dict, batch: int = 2, latent: int = 16, tokens: int = 77, seed: int = 0):
    """As sgm's wrapper calls the UNet (``context=``, ``y=``), or diffusers' UNet where sgm is absent."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=generator)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, config["context_dim"], generator=generator)
    if sgm_available():
        return (x, t), {"context": context, "y": torch.randn(batch, config["adm_in_channels"], generator=generator)}
    time_ids = torch.randn(batch, 6, generator=generator)
    text_embeds = torch.randn(batch, config["adm_in_channels"] - 6 * _size_embedding_dim(config), generator=generator)
    return (x, t, context), {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}, "return_dict": False}


def output_tensor(output) -> torch.Tensor:
    """diffusers returns a tuple with ``return_dict=False``; ldm and sgm a tensor."""
    return output[0] if isinstance(output, tuple) else output
