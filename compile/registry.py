"""Which compiled UNet serves which eager UNet."""
from __future__ import annotations

import collections
from typing import Callable

import torch

from .engine import CompiledUNet
from .options import CompileOptions
from .structure import structure_key


class CompiledUNets:
    """Compiled UNets by structure key, least recently used first out.

    A compiled UNet is bound to one eager module object: when webui hands over another object (even of the same
    structure) the old entry is replaced, so a graph never runs weights of a model webui no longer uses. ``capacity``
    bounds how many UNets stay compiled; an evicted entry drops its graphs and its reference to the eager module, so
    its GPU memory is freed once webui drops the model too.
    """

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, CompiledUNet] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        unet: torch.nn.Module,
        options: CompileOptions,
        *,
        recompile: bool = False,
        on_compile_start: Callable[[], None] | None = None,
        on_compile_end: Callable[[], None] | None = None,
    ) -> tuple[CompiledUNet, bool]:
        """Returns ``(compiled, reused)``; ``reused`` is False when a new wrapper was made (it compiles on first call)."""
        key = structure_key(unet)
        entry = self._entries.get(key)
        reused = entry is not None and entry.eager is unet and entry.options == options and not recompile
        if not reused:
            entry = CompiledUNet(unet, options)
            self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        entry.on_compile_start = on_compile_start
        entry.on_compile_end = on_compile_end
        entry.failure = None
        return entry, reused
