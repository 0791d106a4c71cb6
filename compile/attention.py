"""A traceable cross-attention for ldm's and sgm's ``CrossAttention`` modules.

Webui replaces ``CrossAttention.forward`` at class level with its "Cross attention optimization" (Doggettx, sdp,
sdp-no-mem, xformers, ...). Several of those cannot be captured in one graph: the split-attention variants read free GPU
memory to choose a slice size, and sdp-no-mem enters ``torch.backends.cuda.sdp_kernel``. While a compiled UNet runs,
``SdpaAttention`` gives every attention module an instance-level forward that calls PyTorch's SDPA instead; the eager
module is left exactly as webui made it between calls.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from .patching import patched
from .quantization import projections

ATTENTION_CLASS_NAMES = frozenset({"CrossAttention", "MemoryEfficientCrossAttention"})


def is_cross_attention(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ATTENTION_CLASS_NAMES and all(
        hasattr(module, name) for name in ("heads", "to_q", "to_k", "to_v", "to_out")
    )


def sdpa_forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None, *, upcast: bool, **_unused):
    """softmax(q k^T / sqrt(d)) v over ``self.heads`` heads, the function every webui attention variant computes; the
    projections packed for one 8-bit GEMM where the module holds a pack (``quantization.projections``)."""
    if mask is not None:
        raise NotImplementedError("attention masks are not used by the SD UNets and are not supported when compiled")
    q, k, v = projections(self, x, context)
    batch, tokens, inner_dim = q.shape
    head_dim = inner_dim // self.heads
    q, k, v = (t.view(batch, -1, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, tokens, inner_dim).to(dtype)
    return self.to_out(out)


def kernel_preference(kernel: str) -> contextlib.AbstractContextManager:
    """SDPA kernels in order of preference while a graph is traced (``CompileOptions.attention_kernel``); the others
    stay allowed after the preferred one, for shapes it does not support."""
    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kernel]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first, *(backend for backend in rest if backend != first)], set_priority=True)


class SdpaAttention:
    """Installs and removes ``sdpa_forward`` on every cross-attention module of one UNet.

    The bound methods are made once and reused, so the compiled graph's guards, which check the identity of each
    module's ``forward``, hold from call to call."""

    def __init__(self, unet: torch.nn.Module, *, upcast: bool):
        def bound(module):
            def forward(self, *args, **kwargs):
                return sdpa_forward(self, *args, upcast=upcast, **kwargs)

            return types.MethodType(forward, module)

        self._forwards = [(module, bound(module)) for module in unet.modules() if is_cross_attention(module)]

    def __len__(self) -> int:
        return len(self._forwards)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [module for module, _ in self._forwards]

    @property
    def classes(self) -> list[type]:
        return list(dict.fromkeys(type(module) for module, _ in self._forwards))

    def installed(self) -> contextlib.AbstractContextManager:
        """Whatever instance ``forward`` a module had (another extension's wrapper) is put back afterwards, untouched."""
        return patched((module, "forward", forward) for module, forward in self._forwards)
