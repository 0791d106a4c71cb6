"""Weights in host memory: page-locked copies (``host_copies``, also for LoRA backups), and the full-precision weights
of quantized layers held there while only their 8-bit copies are needed on the GPU (``park``).

A quantized layer's compiled graph reads its 8-bit copy, never its full-precision weight (``quantization.OUTPUT_DTYPE``),
so that weight can wait in host memory: SDXL in int8 then keeps about 3.1 GiB of UNet weights on the GPU instead of 6.5
(4.8 unquantized). Parking keeps the ``weight`` Parameter and gives it a host copy as its data, so whatever handles the
weight as a tensor goes on working: webui loading a checkpoint into it, ``state_dict``, ``.to()``, which brings it back
to the GPU. What computes with it on the GPU would fail instead: the eager UNet's forward and webui's Lora fusing into
it. Those first bring the weights back (``unpark``): the engine before an eager call, the LoRA glue before fusing, and,
after a generation, the eager UNet's own forward (``guard``), since webui may then run it eagerly. A weight brought back
keeps its host copy: parking it again unchanged copies nothing, and changed (a LoRA) copies it into that same memory.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch

from .quantization import QUANTIZED_WEIGHT, replace_weight_data, weight_source

PARKED = "onediff_parked_from"
"""A parked layer's attribute: the device its weight came from, and goes back to."""
HOST_COPY = "onediff_host_copy"
"""A layer's attribute once parked: (its host copy, ``weight_source`` of the device weight that copy equals)."""
GUARD = "onediff_parked_weights_guard"
"""The UNet's attribute while ``guard``ed: the handle of its forward pre-hook."""


def host_copies(tensors: Sequence[torch.Tensor], *, pin: bool, buffer_bytes: int = 1 << 28) -> list[torch.Tensor]:
    """Host copies of ``tensors``, packed into buffers of up to ``buffer_bytes``, page-locked if ``pin`` (for weights
    on a GPU) and then copied without waiting (order them by the stream).

    Page-locked because only such memory copies to and from the GPU asynchronously and at full bus speed. Few buffers
    because page-locking is slow per allocation (hundreds of layers). Buffers of a power-of-two size because torch's
    pinned allocator rounds every request up to one: one 5 GiB buffer for SDXL would lock 8 GiB of host memory. A
    tensor larger than ``buffer_bytes`` gets a buffer of its own."""
    places, buffer_sizes = [], []  # (buffer, offset) per tensor; bytes used per buffer
    for tensor in tensors:
        size = -(-tensor.numel() * tensor.element_size() // 64) * 64  # keep every view 64-byte aligned
        if not buffer_sizes or buffer_sizes[-1] + size > buffer_bytes:
            buffer_sizes.append(0)
        places.append((len(buffer_sizes) - 1, buffer_sizes[-1]))
        buffer_sizes[-1] += size
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in buffer_sizes]
    copies = []
    for tensor, (index, offset) in zip(tensors, places):
        size = tensor.numel() * tensor.element_size()
        copy = buffers[index][offset:offset + size].view(tensor.dtype).view(tensor.shape)
        copies.append(copy.copy_(tensor, non_blocking=pin))
    return copies


LAYERS_WITH_HOST_COPIES: weakref.WeakSet = weakref.WeakSet()


def is_parked(layer: torch.nn.Module) -> bool:
    """Whether the layer's weight is its host copy (webui may have moved it back since, with ``.to()``)."""
    return PARKED in layer.__dict__ and layer.weight.data_ptr() == layer.__dict__[HOST_COPY][0].data_ptr()


def parked_from(layer: torch.nn.Module) -> torch.device | None:
    """The device a parked layer's weight came from and goes back to; None when it is not parked."""
    return layer.__dict__[PARKED] if is_parked(layer) else None


def parked_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in unet.modules() if is_parked(module)]


def park(layers: Iterable[torch.nn.Module]) -> int:
    """Moves the full-precision weight of each quantized layer to host memory (page-locked for a GPU), copying only
    where the host copy from an earlier ``park`` is out of date; returns how many bytes left the device. The layers'
    8-bit copies stay current where they were (``replace_weight_data``)."""
    moving = [layer for layer in layers if QUANTIZED_WEIGHT in layer._buffers and not is_parked(layer)
              and not layer.weight.is_meta]
    stale = [layer for layer in moving
             if layer.__dict__.get(HOST_COPY, (None, None))[1] != weight_source(layer.weight)]
    on_gpu = any(layer.weight.is_cuda for layer in moving)
    # A weight that changed since its last park (a LoRA) is written into its old host copy: page-locking new memory
    # costs far more than the copy.
    rewritable = [layer for layer in stale if HOST_COPY in layer.__dict__
                  and _same_layout(layer.__dict__[HOST_COPY][0], layer.weight)]
    for layer in rewritable:
        layer.__dict__[HOST_COPY][0].copy_(layer.weight.detach(), non_blocking=on_gpu)
    new = [layer for layer in stale if layer not in rewritable]
    copies = host_copies([layer.weight.detach() for layer in new], pin=on_gpu)
    if on_gpu:
        torch.cuda.synchronize()  # the copies run asynchronously: done before anyone reads them
    for layer, copy in zip(new, copies):
        layer.__dict__[HOST_COPY] = (copy, None)
        LAYERS_WITH_HOST_COPIES.add(layer)
    moved = 0
    for layer in moving:
        moved += layer.weight.numel() * layer.weight.element_size()
        layer.__dict__[PARKED] = layer.weight.device
        replace_weight_data(layer, layer.__dict__[HOST_COPY][0])
    return moved


def _same_layout(copy: torch.Tensor, weight: torch.Tensor) -> bool:
    return (copy.shape, copy.dtype) == (weight.shape, weight.dtype)


def unpark(layers: Iterable[torch.nn.Module]) -> None:
    """Brings each parked layer's weight back to the device it came from; keeps the host copy for the next ``park``.
    A weight that webui moved itself (``.to()``) is only marked as back, and its host copy, maybe out of date, dropped."""
    for layer in [layer for layer in layers if PARKED in layer.__dict__]:
        device = layer.__dict__.pop(PARKED)
        copy = layer.__dict__[HOST_COPY][0]
        if layer.weight.data_ptr() != copy.data_ptr():
            del layer.__dict__[HOST_COPY]
            continue
        # A copy also where the host is the device: the host copy is a view into a buffer shared with other layers.
        replace_weight_data(layer, copy.to(device, non_blocking=copy.is_pinned(), copy=True))
        layer.__dict__[HOST_COPY] = (copy, weight_source(layer.weight))


def release_dropped() -> None:
    """Webui drops a model by moving it to the meta device; reference cycles may keep it alive for a while, and with it
    the host copies on its layers (page-locked memory, SDXL about 4 GiB): released now."""
    for layer in list(LAYERS_WITH_HOST_COPIES):
        if layer.weight.is_meta:
            layer.__dict__.pop(HOST_COPY, None)
            layer.__dict__.pop(PARKED, None)
            LAYERS_WITH_HOST_COPIES.discard(layer)


def guard(unet: torch.nn.Module) -> None:
    """Until the next ``unguard``, the first call of ``unet`` that finds parked weights brings them back first. Not
    while a compiled UNet stands in for ``unet``: its graph would trace the hook."""
    if GUARD in unet.__dict__ or not parked_layers(unet):
        return

    def unpark_before_call(module, args):
        unpark(module.modules())
        unguard(module)

    unet.__dict__[GUARD] = unet.register_forward_pre_hook(unpark_before_call)


def unguard(unet: torch.nn.Module) -> None:
    handle = unet.__dict__.pop(GUARD, None)
    if handle is not None:
        handle.remove()
