"""LoRA with a compiled UNet: the active networks are fused into the parameters in place, before a compiled call.

A compiled graph reads the UNet's parameters on every call but never runs the patched layer ``forward``s through which
webui's builtin Lora extension applies networks (``compile/layers.py``). So the weights themselves must hold the LoRA:
``FusedLoras`` keeps them in step with webui's active set, using webui's own functions (passed in, nothing imported),
which back up each original weight once and restore it bit-exactly before fusing a new set, or none.

Where the time goes: the first LoRA after a checkpoint load backs up the original weights of every layer a network
touches (SDXL with a LoRA on all transformer Linears: 4.1 GiB); every change restores them and adds the new deltas.
Backups in GPU memory make both a device-side copy (milliseconds); where the GPU has no room to spare they go to
page-locked host memory (``host_copies``), whose allocation costs seconds once and whose copies run at bus speed.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable, Sequence

import torch

from ..compile.host_memory import host_copies


class FusedLoras:
    """``sync(wanted)`` before each compiled call; cheap when nothing changed.

    ``layers``: the UNet's layers that networks can touch. ``fused(layer)``: the set fused into that layer now.
    ``fuse(layer)``: restore the layer's original weights, then fuse the wanted set into them, in place.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], fused: Callable[[torch.nn.Module], Hashable],
                 fuse: Callable[[torch.nn.Module], None],
                 back_up: Callable[[Sequence[torch.nn.Module]], None] = lambda layers: None):
        self.layers = list(layers)
        self._fused = fused
        self._fuse = fuse
        self._back_up = back_up
        """``back_up(layers)``: make the backups ``fuse`` would make one layer at a time, at once for the stale layers a
        wanted network touches. Not for the others: webui's own Lora, in an eager generation with a LoRA, backs up every
        layer it patches, touched or not (pageable host memory); ``back_up`` moves such backups to faster memory, which
        for untouched layers (SDXL 0.67 GiB, SD1.5 1.15 GiB) buys nothing: they are restored once and left as they are."""
        self._synced: Hashable | None = None
        self._witness: torch.nn.Module | None = None
        """A layer the last sync fused: webui's Lora resets every layer's fused set when weights are loaded into it
        (``_load_from_state_dict``), so one changed layer means the weights were reloaded under an unchanged set."""
        self.seconds: list[float] = []
        """Wall time of each sync that changed weights."""

    def sync(self, wanted: Hashable, touches: Callable[[torch.nn.Module], bool] = lambda layer: True) -> float | None:
        """Fuses ``wanted`` where a layer holds anything else; returns the seconds it took, or None if nothing changed.

        Every layer is checked whenever ``wanted`` differs from the last sync, or the witness layer no longer holds
        it: a checkpoint loaded in between (a refiner of the same architecture, loaded in place) resets layers without
        changing the wanted set, and webui may have fused some layers itself in an eager call.
        ``touches(layer)``: whether a wanted network changes that layer; a layer it does not, holding nothing
        (``fused`` falsy), is left alone: no backup, no copy."""
        if wanted == self._synced and (self._witness is None or self._fused(self._witness) == wanted):
            return None
        stale = [layer for layer in self.layers if self._fused(layer) != wanted and (self._fused(layer) or touches(layer))]
        self._synced = self._witness = None  # set again once all stale layers are fused: a fuse may raise midway
        seconds = None
        if stale:
            started = time.perf_counter()
            with torch.no_grad():
                to_back_up = [layer for layer in stale if touches(layer)]
                if to_back_up:
                    self._back_up(to_back_up)
                for layer in stale:
                    self._fuse(layer)
            if any(p.is_cuda for p in stale[0].parameters()):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            self.seconds.append(seconds)
        self._synced = wanted
        self._witness = next((layer for layer in self.layers if self._fused(layer) == wanted), None) if wanted else None
        return seconds


def fits_on_gpu(backup_bytes: int, free_bytes: int, total_bytes: int) -> bool:
    """Whether backups of ``backup_bytes`` may go to GPU memory: only if, after them, at least a quarter of the card
    (and no less than 6 GiB) stays free for what follows sampling -- VAE decoding, hires fix -- so that a LoRA never
    makes a generation run out of memory that would fit without it."""
    return free_bytes - backup_bytes >= max(total_bytes // 4, 6 << 30)


def backup_copies(tensors: Sequence[torch.Tensor], device: torch.device, on_device: bool) -> list[torch.Tensor]:
    """Exact copies of ``tensors``, backups of weights that live on ``device``: on that device if ``on_device``, else
    on the host, page-locked when ``device`` is a GPU."""
    if on_device:
        return [tensor.to(device, copy=True) for tensor in tensors]
    return host_copies(tensors, pin=device.type == "cuda")
