"""PyTorch's own definitions of the layers webui's builtin Lora extension patches.

That extension replaces ``forward`` of ``torch.nn.Linear``, ``Conv2d``, ``GroupNorm`` and ``LayerNorm`` at class level
with functions that compare the active LoRA set on every call and rewrite weights when it changed. Traced into a graph,
that bookkeeping would turn every LoRA change into a recompile, or break the graph. While a compiled UNet runs,
``plain_layers()`` puts the definitions back; LoRA weights are fused into the parameters beforehand instead.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .patching import patched
from .quantization import QUANTIZED_WEIGHT, quantized_linear


def linear_forward(self, input):
    if QUANTIZED_WEIGHT in self._buffers:  # the "Model Quantization" checkbox (compile/quantization.py)
        return quantized_linear(self, input)
    return F.linear(input, self.weight, self.bias)


def conv2d_forward(self, input):
    return self._conv_forward(input, self.weight, self.bias)


def group_norm_forward(self, input):
    return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def layer_norm_forward(self, input):
    return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


PLAIN_FORWARDS = {
    torch.nn.Linear: linear_forward,
    torch.nn.Conv2d: conv2d_forward,
    torch.nn.GroupNorm: group_norm_forward,
    torch.nn.LayerNorm: layer_norm_forward,
}


def plain_layers() -> contextlib.AbstractContextManager:
    """Class-level, for the duration of one compiled call: subclasses such as ldm's ``GroupNorm32`` reach the layer
    through ``super().forward``, which an instance attribute cannot intercept. Webui runs one generation at a time."""
    return patched((layer, "forward", forward) for layer, forward in PLAIN_FORWARDS.items())
