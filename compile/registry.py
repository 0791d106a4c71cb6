"""Which compiled UNet serves which eager UNet."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch._dynamo

from .engine import CompiledUNet
from .options import CompileOptions
from .structure import structure_key


@dataclasses.dataclass
class Lookup:
    compiled: CompiledUNet
    how: str
    """``"reused"`` (same module object as last time), ``"rebound"`` (another object of a structure compiled before:
    its graphs serve the new object's weights, no recompile) or ``"new"`` (compiles on the first call)."""


class CompiledUNets:
    """One backend (its compiled graphs) per UNet structure, at most ``capacity`` structures.

    A wrapper is bound to one eager module object and is replaced when webui hands over another object, so a graph
    never reads the weights of a model webui has dropped. When a structure beyond ``capacity`` arrives, every compiled
    graph is dropped (``torch._dynamo.reset()``), which frees their CUDA graphs and lets webui free unloaded models;
    compiling again then mostly hits Inductor's on-disk cache. Six: with ControlNet each architecture has three
    structures (the plain UNet, its residual pass, the ControlNet model), and a session that mixes SD1.5 and SDXL with
    ControlNet would otherwise drop and recompile everything on each change of architecture.

    An entry is a structure with its options: a quantized format (``CompileOptions.quantization``) is an entry of its
    own, with its own graphs and its own choice of layers, beside the structure's unquantized one.
    """

    def __init__(self, capacity: int = 6):
        self.capacity = capacity
        self._entries: dict[tuple, CompiledUNet] = {}

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
    ) -> Lookup:
        key = (structure_key(unet), options)
        entry = self._entries.get(key)
        if entry is not None and not recompile:
            how = "reused" if entry.eager is unet else "rebound"
            if how == "rebound":
                entry = CompiledUNet(unet, options, backend=entry.backend)
        else:
            if key not in self._entries and len(self._entries) >= self.capacity:
                self.clear()
            how, entry = "new", CompiledUNet(unet, options)
        self._entries[key] = entry
        entry.on_compile_start = on_compile_start
        entry.on_compile_end = on_compile_end
        entry.before_call = None
        entry.start_generation()
        return Lookup(entry, how)

    def clear(self) -> None:
        self._entries.clear()
        torch._dynamo.reset()
