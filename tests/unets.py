"""Tiny UNets of the real architectures, for CPU tests.

SD1.x/SD2.x come from ldm's ``UNetModel`` (webui's ``repositories/stable-diffusion-stability-ai`` when
``SD_WEBUI_PATH`` is set, else the same code from PyPI's stable-diffusion-sdkit); SDXL from sgm's ``UNetModel`` when
webui is there, else diffusers' SDXL UNet (``addition_embed_type="text_time"``), the same network in another codebase.
Sizes follow ``../shared/webui-offline/configs``: every block type of the full models, at width 32.
"""
from __future__ import annotations

import importlib.util

import torch

TINY = dict(image_size=32, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
            channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=1, legacy=False)
SGM_AVAILABLE = importlib.util.find_spec("sgm") is not None


def randomize(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, zero-initialised output layers included (else every input gives the same output),
    scaled so activations stay in a sane range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return unet.eval()


def sd15(seed: int = 0, in_channels: int = 4) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return randomize(UNetModel(in_channels=in_channels, num_heads=2, context_dim=64, **TINY), seed)


def sd2(seed: int = 0) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return randomize(UNetModel(in_channels=4, num_head_channels=16, context_dim=96, use_linear_in_transformer=True, **TINY), seed)


def sdxl(seed: int = 0) -> torch.nn.Module:
    if SGM_AVAILABLE:
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        return randomize(UNetModel(
            adm_in_channels=96, num_classes="sequential", in_channels=4, out_channels=4, model_channels=32,
            attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16,
            use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 1], context_dim=80,
            spatial_transformer_attn_type="softmax-xformers", legacy=False,
        ), seed)
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=80,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8,
        use_linear_projection=True,
    ), seed)


def sdxl_inputs(batch: int = 2, size: int = 16, tokens: int = 7, seed: int = 0) -> tuple[tuple, dict]:
    """Positional and keyword arguments for ``sdxl()``, as webui (sgm) or diffusers calls it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, 80, generator=generator)
    if SGM_AVAILABLE:
        return (x, t), dict(context=context, y=torch.randn(batch, 96, generator=generator))
    added = {"text_embeds": torch.randn(batch, 48, generator=generator), "time_ids": torch.randn(batch, 6, generator=generator)}
    return (x, t, context), dict(added_cond_kwargs=added, return_dict=False)


def sd_inputs(batch: int = 2, size: int = 16, tokens: int = 7, context_dim: int = 64, in_channels: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    return (x, torch.full((batch,), 500.0)), dict(context=torch.randn(batch, tokens, context_dim, generator=generator))


def first_tensor(output):
    """diffusers returns a tuple with ``return_dict=False``; ldm and sgm a tensor."""
    return output[0] if isinstance(output, tuple) else output
