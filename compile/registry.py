"""Which compiled UNet serves which eager UNet."""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable

import torch
import torch._dynamo

from .engine import CompiledUNet, InductorBackend, one_set_of_cudagraph_trees
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
    own, with its own graphs and its own choice of layers (kept by its backend), beside the structure's unquantized one.

    A model webui has unloaded is let go at the next lookup: its wrapper would keep the module alive, and with it what
    other code left on its layers besides the parameters, such as LoRA backups in GPU memory (SDXL: up to 4.1 GiB).
    Its structure's compiled graphs stay.
    """

    def __init__(self, capacity: int = 6):
        self.capacity = capacity
        self._backends: dict[tuple, InductorBackend] = {}
        self._wrappers: dict[tuple, CompiledUNet] = {}
        """The last wrapper of each structure, while webui still holds its module."""

    def __len__(self) -> int:
        return len(self._backends)

    def get(
        self,
        unet: torch.nn.Module,
        options: CompileOptions,
        *,
        recompile: bool = False,
        on_compile_start: Callable[[], None] | None = None,
        on_compile_end: Callable[[], None] | None = None,
    ) -> Lookup:
        self._let_go_of_dropped_models()
        key = (structure_key(unet), options)
        backend, wrapper = self._backends.get(key), self._wrappers.get(key)
        if backend is not None and not recompile:
            how = "reused" if wrapper is not None and wrapper.eager is unet else "rebound"
            entry = wrapper if how == "reused" else CompiledUNet(unet, options, backend=backend)
        else:
            if key not in self._backends and len(self._backends) >= self.capacity:
                self.clear()
            how, entry = "new", CompiledUNet(unet, options)
        self._backends[key], self._wrappers[key] = entry.backend, entry
        entry.on_compile_start = on_compile_start
        entry.on_compile_end = on_compile_end
        entry.before_call = None
        entry.on_out_of_memory = self.release_memory
        entry.start_generation()
        return Lookup(entry, how)

    def _let_go_of_dropped_models(self) -> None:
        """Webui moves a model it unloads to the meta device."""
        for key, wrapper in list(self._wrappers.items()):
            first = next(wrapper.eager.parameters(), None)
            if first is not None and first.is_meta:
                del self._wrappers[key]

    def clear(self) -> None:
        """Drops every compiled graph; wrappers still in use compile again on their next call (Dynamo refuses only
        recompiles, and no graph is left to recompile)."""
        self._backends.clear()
        self._wrappers.clear()
        one_set_of_cudagraph_trees()  # the reset frees the calling thread's CUDA-graph trees: make them everyone's
        torch._dynamo.reset()

    def release_memory(self) -> None:
        """After CUDA ran out of memory in a compiled call: drops every graph and gives the CUDA-graph pools and the
        allocator's cached blocks back, so that the eager call that follows has the memory eager webui would have.
        The next generation compiles again (mostly from Inductor's on-disk cache)."""
        self.clear()
        gc.collect()  # the failed call's tensors may sit in reference cycles with its frames
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
