"""The UNet with control residuals as inputs: the pass that ControlNet and T2I-Adapter units run through, compiled.

sd-webui-controlnet adds its controls to the UNet in two ways (its ``UnetHook`` forward): a T2I-Adapter adds to an
input block's output, which flows on into the next block and into the skip connection; a ControlNet adds to the skip
connections only, and to the middle block's output. ``ResidualPass`` takes all of them as tensors, one per slot and
every slot always a tensor (zeros where there is no control), so one compiled graph serves every ControlNet request
whatever its units, weights or start/end: they change the residuals' values, never the graph. The plain UNet keeps
its own graph for generations without control. With zero residuals the pass computes exactly the plain UNet
(``x + 0 == x``).

Per input block ``i`` the pass computes ``out = block(h)``, the next block's input ``out + inputs[i]`` and the skip
connection ``out + skips[i]``; then ``middle_block(h) + middle``. The output blocks concatenate as ControlNet's forward
does: where the upsampled tensor and the skip connection differ in size (sizes that are not multiples of 64), the
upsampled one is resized (nearest) to the skip connection's. The input is used as it comes (ControlNet's forward, unlike
ldm's, does not cast it to the UNet's dtype).
"""
from __future__ import annotations

import sys
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .sharing import share_registries


class Residuals(NamedTuple):
    inputs: tuple[torch.Tensor, ...]
    """Added to each input block's output, flowing on into the next block and the skip connection (T2I-Adapter)."""
    skips: tuple[torch.Tensor, ...]
    """Added to each input block's output on its skip connection, instead of ``inputs``: their sum where a T2I-Adapter
    and a ControlNet both add to one block (ControlNet's own forward adds them one after the other: the same up to
    float rounding), else the one that is there."""
    middle: torch.Tensor
    """Added to the middle block's output."""


class ResidualPass(torch.nn.Module):
    """``forward(x, timesteps, context, y, residuals)``: an ldm or sgm ``UNetModel`` with residuals added.

    Owns no weights: its parameters, buffers and submodules are the UNet's, under the same names (as ``CompiledUNet``),
    so the engine compiles it like a UNet and a checkpoint loaded into the UNet is used on the next call. Reads from the
    UNet object only the hyperparameter its constructor set (``model_channels``), so it holds no reference to it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        share_registries(self, unet)
        self.model_channels = unet.model_channels
        # The UNet's module, read at call time: webui patches its ``timestep_embedding`` and ``th`` like the UNet sees.
        object.__setattr__(self, "unet_module", sys.modules[type(unet).__module__])

    def forward(self, x, timesteps, context, y, residuals: Residuals):
        embedding = self.unet_module.timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(embedding)
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x
        skips = []
        for block, flowing, skip in zip(self.input_blocks, residuals.inputs, residuals.skips, strict=True):
            out = block(h, emb, context)
            skips.append(out + skip)
            h = out + flowing
        h = self.middle_block(h, emb, context) + residuals.middle
        for block in self.output_blocks:
            h = block(cat_resized(h, skips.pop()), emb, context)
        return self.out(h.type(x.dtype))


def cat_resized(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if h.shape[-2:] != skip.shape[-2:]:
        h = F.interpolate(h, skip.shape[-2:], mode="nearest")
    return torch.cat([h, skip], dim=1)


_passes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def residual_pass(unet: torch.nn.Module) -> ResidualPass:
    """The one ``ResidualPass`` of ``unet`` (the same object on every call, so the registry finds its graphs)."""
    found = _passes.get(unet)
    if found is None:
        found = _passes[unet] = ResidualPass(unet)
    return found


def zero_residuals(shapes: "BlockShapes", dtype: torch.dtype, device: torch.device) -> Residuals:
    zeros = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes.inputs)
    return Residuals(zeros, zeros, torch.zeros(shapes.middle, dtype=dtype, device=device))


class BlockShapes(NamedTuple):
    inputs: tuple[tuple[int, ...], ...]
    """Each input block's output."""
    middle: tuple[int, ...]
    outputs: tuple[tuple[int, ...], ...]
    """Each output block's output; the last one is ``out``'s input."""


class UnknownLayer(ValueError):
    """A layer whose output shape ``block_shapes`` cannot tell."""


def block_shapes(unet: torch.nn.Module, x_shape: Sequence[int]) -> BlockShapes:
    """The shape of every block's output for an input of ``x_shape``, from the layers' hyperparameters, without
    running anything (ldm's and sgm's block layers: convolutions, ``ResBlock``, ``SpatialTransformer``, ``Downsample``,
    ``Upsample``). Raises ``UnknownLayer`` for any other layer."""
    shape = tuple(x_shape)
    inputs = []
    for block in unet.input_blocks:
        shape = _sequence_shape(block, shape)
        inputs.append(shape)
    middle = _sequence_shape(unet.middle_block, shape)
    shape, outputs, skips = middle, [], list(inputs)
    for block in unet.output_blocks:
        skip = skips.pop()
        shape = _sequence_shape(block, (shape[0], shape[1] + skip[1], *skip[2:]))
        outputs.append(shape)
    return BlockShapes(tuple(inputs), middle, tuple(outputs))


def _sequence_shape(block: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    for layer in block if isinstance(block, torch.nn.Sequential) else (block,):
        shape = _layer_shape(layer, shape)
    return shape


def _layer_shape(layer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    batch, _, *spatial = shape
    name = type(layer).__name__
    if isinstance(layer, torch.nn.Conv2d):
        return (batch, layer.out_channels, *_conv_spatial(layer, spatial))
    if name == "ResBlock" and not (getattr(layer, "updown", False)):
        return (batch, layer.out_channels, *spatial)
    if name.startswith("SpatialTransformer"):
        return shape
    if name == "Downsample":
        if isinstance(layer.op, torch.nn.Conv2d):
            return (batch, layer.out_channels, *_conv_spatial(layer.op, spatial))
        return (batch, layer.out_channels, *(size // 2 for size in spatial))
    if name == "Upsample":
        return _layer_shape(layer.conv, (batch, layer.channels, *(size * 2 for size in spatial))) if layer.use_conv else (
            batch, layer.out_channels, *(size * 2 for size in spatial))
    raise UnknownLayer(f"{type(layer).__module__}.{type(layer).__qualname__}")


def _conv_spatial(conv: torch.nn.Conv2d, spatial) -> list[int]:
    return [
        (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        for size, padding, dilation, kernel, stride in zip(spatial, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    ]
