"""Compiling a UNet: ``CompiledUNet`` wraps webui's eager UNet module and runs it through ``torch.compile``.

The eager module stays the single owner of the weights: the compiled graph takes every parameter as an input on each
call (Inductor's ``freezing``, which would bake weights into the graph as constants, stays off), so weights copied into
the parameter buffers in place -- a checkpoint switch, a fused LoRA -- take effect on the next call without a recompile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from typing import Callable

import torch
import torch._dynamo
from torch._inductor.compile_fx import compile_fx
from torch.utils._pytree import tree_map_only

from . import regions
from .attention import SdpaAttention, kernel_preference
from .foreign_hooks import find_class_forwards, find_foreign_hooks, foreign_frame, foreign_hooks_reason, short_path
from .layers import PLAIN_FORWARDS, plain_layers
from .options import CompileOptions
from .sharing import SharedModule

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileStats:
    graphs_compiled: int = 0
    """Graphs handed to Inductor since this UNet was wrapped (one per distinct input shape)."""
    compile_seconds: list[float] = dataclasses.field(default_factory=list)
    """Wall time of each call that compiled, tracing and first run included."""
    call_signatures: set[tuple] = dataclasses.field(default_factory=set)
    """``call_signature`` of every call that ran compiled: one of them compiling again was not for a new shape."""


# Raised while Dynamo traces or looks up graphs; FailOnRecompileLimitHit is not a TorchDynamoException.
DYNAMO_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _uses_cuda(unet: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in unet.parameters())


def call_signature(args, kwargs) -> tuple:
    """What a compiled graph is legitimately specialised on, besides the module: each tensor input's shape, dtype and
    device (``None`` and other plain values as they are), and the grad and autocast modes."""
    leaves, structure = torch.utils._pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    device_type = tensors[0].device.type if tensors else "cpu"
    described = tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in leaves
    )
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type) and (
        torch.get_autocast_dtype(device_type)
    )
    return described, str(structure), torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


def convert_convolutions_to_channels_last(unet: torch.nn.Module) -> None:
    """Re-lay every convolution weight in place; the old storage is freed, so no second copy exists."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.is_contiguous(memory_format=torch.channels_last):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


class InductorBackend:
    """The compiler behind the ``CompiledUNet``s of one UNet structure.

    Dynamo keeps compiled code per backend, guarded by input shapes, dtypes and module attributes, not by the module
    object, and the weights are graph inputs. So a new UNet object of the same structure (webui reloads a model, or
    keeps several), wrapped with the same backend, runs the graphs already compiled: no recompile."""

    def __init__(self, options: CompileOptions, *, cuda_graphs: bool):
        self.stats = CompileStats()
        self.cuda_graphs = cuda_graphs
        self.on_compile_start: Callable[[], None] | None = None
        self._inductor_config = {"triton.cudagraphs": cuda_graphs, "max_autotune": options.max_autotune, "freezing": False}

    def __call__(self, graph_module, example_inputs):
        self.stats.graphs_compiled += 1
        if self.on_compile_start is not None:
            self.on_compile_start()
        return compile_fx(graph_module, example_inputs, config_patches=self._inductor_config)


class CompiledUNet(SharedModule):
    """Called exactly like the eager UNet (``x, timesteps, context, y, ...``) and returns the same tensor.

    Attributes the wrapper does not have (``dtype``, ``in_channels``, ``input_blocks``, ...) are read from the eager
    module, so webui code that inspects ``diffusion_model`` keeps working.

    It owns no weights: its parameters, buffers and submodules are the eager module's, under the same names.

    A call that has to compile and fails (a graph break, an Inductor or Triton error) does not raise: it runs the eager
    module, and ``failure`` holds the reason, which callers must show to the user; every later call runs eagerly too.
    So does a call that finds another extension's hook on the UNet (``foreign_hooks``), or that would compile again,
    after the first call of a generation, for inputs like those of an earlier compiled call (a value the traced code
    reads changed: a step counter would make it compile on every step).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        options: CompileOptions | None = None,
        *,
        backend: InductorBackend | None = None,
        on_compile_start: Callable[[], None] | None = None,
        on_compile_end: Callable[[], None] | None = None,
    ):
        super().__init__(unet)
        self.options = options or CompileOptions()
        self.backend = backend or InductorBackend(self.options, cuda_graphs=self.options.cuda_graphs and _uses_cuda(unet))
        self.failure: str | None = None
        self.on_compile_start = on_compile_start
        """Called when Inductor starts on a new graph (a compile takes seconds to minutes: show progress)."""
        self.on_compile_end = on_compile_end
        """Called after a call that compiled, failed to, or found a reason to run eagerly; ``stats`` and ``failure`` are
        up to date."""
        self.before_call: Callable[[], None] | None = None
        """Called at the start of every call, e.g. to fuse weights that must be in place before the graph reads them."""
        self.expected_class_forwards: frozenset[str] = frozenset()
        """Modules whose class-level forwards on the attention and layer classes this engine swaps during compiled calls
        the swap stands for (webui's attention optimizations, its Lora); any other makes the call eager
        (``foreign_hooks``)."""
        if self.options.channels_last:
            convert_convolutions_to_channels_last(unet)
        self._attention = SdpaAttention(unet, upcast=self.options.upcast_attention) if self.options.attention == "sdpa" else None
        self._regions = regions.region_classes(unet) if self.options.regional and regions.available() else []
        self._named_modules = list(unet.named_modules())
        self._swapped_classes = [*(self._attention.classes if self._attention else ()), *PLAIN_FORWARDS]
        self._value_recompile_allowed = True
        # Kept out of nn.Module's registry: the compiled callable is not a submodule of its own wrapper.
        object.__setattr__(self, "_compiled", torch.compile(unet, backend=self.backend, fullgraph=True, dynamic=False))

    @property
    def stats(self) -> CompileStats:
        """Shared by every wrapper of the same backend, i.e. of one UNet structure."""
        return self.backend.stats

    def start_generation(self) -> None:
        """Forgets the last generation's reason to run eagerly. Its first call may compile again where a value the
        graph reads changed since the last generation (a setting); later calls may not (``forward``)."""
        self.failure = None
        self._value_recompile_allowed = True

    def run_eagerly(self, reason: str) -> None:
        """From now on every call runs the eager module; ``reason`` is shown to the user like a compile failure."""
        self.failure = reason

    def forward(self, *args, **kwargs):
        if self.before_call is not None:
            self.before_call()
        if self.failure is None:
            self._refuse_foreign_hooks()
        if self.failure is not None:
            return self.eager(*args, **kwargs)
        graphs_before = self.stats.graphs_compiled
        signature = call_signature(args, kwargs)
        compiled_before = signature in self.stats.call_signatures and not self._value_recompile_allowed
        self._value_recompile_allowed = False
        started = time.perf_counter()
        try:
            out = self._call_compiled(args, kwargs, compiled_before=compiled_before)
        except Exception as error:  # noqa: BLE001 -- only compile-time failures are absorbed, see below
            compiling = self.stats.graphs_compiled != graphs_before or isinstance(error, DYNAMO_ERRORS)
            if not compiling:
                raise
            self.failure = describe_compile_failure(error, type(self.eager))
            log.error("OneDiff: compiling the UNet failed, running it eagerly: %s", self.failure)
            self._compile_ended()
            return self.eager(*args, **kwargs)
        self.stats.call_signatures.add(signature)
        if self.stats.graphs_compiled != graphs_before:
            self.stats.compile_seconds.append(time.perf_counter() - started)
            self._compile_ended()
        # CUDA-graph outputs live in a static buffer that the next replay overwrites.
        return tree_map_only(torch.Tensor, torch.Tensor.clone, out) if self.backend.cuda_graphs else out

    def _refuse_foreign_hooks(self) -> None:
        """Checked on every call: extensions install hooks when a generation starts, or between steps."""
        hooks = find_class_forwards(self._swapped_classes, self.expected_class_forwards)
        hooks += find_foreign_hooks(self._named_modules)
        if hooks:
            self.run_eagerly(foreign_hooks_reason(hooks))
            log.warning("OneDiff: running the UNet eagerly: %s", self.failure)
            self._compile_ended()

    def _compile_ended(self) -> None:
        if self.on_compile_end is not None:
            self.on_compile_end()

    def _call_compiled(self, args, kwargs, *, compiled_before: bool):
        # Where inputs like these ran compiled before, a recompile is refused before Dynamo traces anything.
        limits = torch._dynamo.config.patch(
            recompile_limit=self.options.max_graphs_per_unet, fail_on_recompile_limit_hit=True,
            error_on_recompile=compiled_before,
        )
        attention = self._attention.installed() if self._attention else contextlib.nullcontext()
        kernels = kernel_preference(self.options.attention_kernel)
        with limits, attention, kernels, plain_layers(), regions.compiled_once(self._regions):
            self.backend.on_compile_start = self.on_compile_start
            if self.backend.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(*args, **kwargs)


def describe_compile_failure(error: BaseException, unet_class: type) -> str:
    """One line for the UI: the error's first line, with advice for the failures users can act on, naming the code
    outside the UNet's own where tracing failed in it."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, torch._dynamo.exc.RecompileError):
        return (
            f"a value the compiled UNet reads changed between calls with inputs of the same shapes "
            f"({value_recompile(error)}): code another extension put in the UNet's path depends on a value that changes "
            "during a generation (a step counter?), which would compile again on every change; turn that extension off "
            "for this generation to compile"
        )
    if isinstance(error, torch._dynamo.exc.FailOnRecompileLimitHit):
        return (
            f"compile failed: this UNet already holds the most compiled graphs allowed ({first_line}); "
            "generate at fewer distinct sizes, batch sizes or prompt lengths, or restart webui to drop the old graphs"
        )
    where = foreign_frame(error, unet_class)
    if where is not None:
        return (
            f"compile failed in {where}, code another extension put in the UNet's path ({type(error).__name__}: "
            f"{first_line}); turn that extension off for this generation to compile"
        )
    if isinstance(error, torch._dynamo.exc.Unsupported):
        return (
            f"compile failed: the UNet cannot be captured in one graph ({first_line}); another extension that patches "
            "the UNet's forward (e.g. ControlNet, hypernetworks) is the usual cause: disable it for this generation"
        )
    return f"compile failed: {type(error).__name__}: {first_line}"


def value_recompile(error: torch._dynamo.exc.RecompileError) -> str:
    """The first guard that failed, from Dynamo's message (``- 0/3: G['th'].step == 2  # <source>  # <file>:<line> in
    <function>``), as ``G['th'].step == 2, read by <function> in <file>:<line>``."""
    failures = [line.strip()[2:] for line in str(error).splitlines() if line.strip().startswith("- ")]
    if not failures:
        return str(error).strip().splitlines()[0]
    guard, *comments = (part.strip() for part in failures[0].split(": ", 1)[-1].split("#"))
    location = re.fullmatch(r"(.+):(\d+) in (.+)", comments[-1]) if comments else None
    if location is None:
        return guard
    filename, line, function = location.groups()
    return f"{guard}, read by {function} in {short_path(filename)}:{line}"
