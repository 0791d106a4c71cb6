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

from . import host_memory, quantization, regions
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


try:
    from torch._inductor import cudagraph_trees as _cudagraph_trees

    _SHARED_TREES = tuple(_cudagraph_trees.get_obj(_cudagraph_trees.local, name)
                          for name in ("tree_manager_containers", "tree_manager_locks"))
except Exception:  # noqa: BLE001 -- torch's internals moved: each thread keeps trees of its own, torch's default
    _SHARED_TREES = None


def one_set_of_cudagraph_trees() -> None:
    """Makes the calling thread record and replay CUDA graphs in the trees of the thread that imported this module.

    Inductor keeps CUDA-graph trees (the recordings and the private memory pool they allocate from) per thread and
    device, and a compiled graph records into the trees of the thread that first runs it. Webui answers each request
    in a worker thread of a pool, so one session's graphs would scatter over several trees, each with a pool the others
    cannot reuse, and ``torch._dynamo.reset()`` would free only the calling thread's. Webui runs one generation at a
    time, so one set of trees serves every thread, as torch itself shares them with its autograd threads."""
    if _SHARED_TREES is not None and getattr(_cudagraph_trees.local, "tree_manager_containers", None) is not _SHARED_TREES[0]:
        _cudagraph_trees.local.tree_manager_containers, _cudagraph_trees.local.tree_manager_locks = _SHARED_TREES


def relay_convolutions(unet: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """Re-lays every convolution weight in ``memory_format`` within its own storage: only the order of the elements
    changes, the address stays, so CUDA-graph recordings and LoRA backups keep pointing at the same memory and no
    second copy of the weights is kept. Only weights laid densely in one of the two orders are touched: another
    layout could share its storage with other data."""
    with torch.no_grad():
        for module in unet.modules():
            if not isinstance(module, torch.nn.Conv2d) or module.weight.is_contiguous(memory_format=memory_format):
                continue
            if module.weight.is_contiguous() or module.weight.is_contiguous(memory_format=torch.channels_last):
                try:
                    relaid = module.weight.contiguous(memory_format=memory_format)
                except torch.OutOfMemoryError:  # no room on the GPU for one layer's copy: make it in host memory
                    relaid = module.weight.cpu().contiguous(memory_format=memory_format)
                module.weight.data = module.weight.data.as_strided(relaid.shape, relaid.stride())
                module.weight.copy_(relaid)


class InductorBackend:
    """The compiler behind the ``CompiledUNet``s of one UNet structure.

    Dynamo keeps compiled code per backend, guarded by input shapes, dtypes and module attributes, not by the module
    object, and the weights are graph inputs. So a new UNet object of the same structure (webui reloads a model, or
    keeps several), wrapped with the same backend, runs the graphs already compiled: no recompile."""

    def __init__(self, options: CompileOptions, *, cuda_graphs: bool):
        self.stats = CompileStats()
        self.cuda_graphs = cuda_graphs
        self.quantization: quantization.Quantization | None = None
        """With ``CompileOptions.quantization``: the layers every wrapper of this backend quantizes, chosen on the first
        call (its graphs are compiled for exactly these)."""
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

    A compiled call that fails, compiling (a graph break, an Inductor or Triton error) or running (CUDA out of memory
    in a first replay), does not raise: it runs the eager module, with the convolutions laid back as eager webui has
    them, and ``failure`` holds the reason (``describe_failure``), which callers must show to the user; every later
    call of the generation runs eagerly too.
    So does a call that finds another extension's hook on the UNet (``foreign_hooks``), or that would compile again,
    after the first call of a generation, for inputs like those of an earlier compiled call (a value the traced code
    reads changed: a step counter would make it compile on every step).

    With ``options.quantization``, the compiled calls run the chosen layers in 8 bits (``quantization``); eager calls
    never do. Their 8-bit copies are rewritten where the weights changed when a generation starts, on ``requantize``,
    and when a witness layer shows that a checkpoint was loaded in place between two calls.
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
        self.on_out_of_memory: Callable[[], None] | None = None
        """Called when a compiled call ran out of GPU memory, before the call is made again eagerly: it must free what
        compiled graphs hold (CUDA-graph pools, which eager calls cannot allocate from), or the eager call runs out of
        memory too where eager webui alone would fit (``CompiledUNets.release_memory``)."""
        self.expected_class_forwards: frozenset[str] = frozenset()
        """Modules whose class-level forwards on the attention and layer classes this engine swaps during compiled calls
        the swap stands for (webui's attention optimizations, its Lora); any other makes the call eager
        (``foreign_hooks``)."""
        self._relay_for_compiled_calls()
        self._attention = SdpaAttention(unet, upcast=self.options.upcast_attention) if self.options.attention == "sdpa" else None
        self._regions = regions.region_classes(unet) if self.options.regional and regions.available() else []
        self._named_modules = list(unet.named_modules())
        self._swapped_classes = [*(self._attention.classes if self._attention else ()), *PLAIN_FORWARDS]
        self._value_recompile_allowed = True
        self._witness: tuple[torch.nn.Module, float | None] | None = None
        """A quantized layer and its static input maximum: ``quantization.is_stale`` on it shows a checkpoint load."""
        self._input_scales_stale = False
        """Static fp8 input scales (``Quantization.input_amax``) measured on other weights: the next call measures them
        again (``quantization.calibrated``) before it runs compiled."""
        self.park_weights = False
        """With quantization: hold the quantized layers' full-precision weights in host memory while compiled calls
        need only their 8-bit copies (``host_memory.park``); they come back for any eager use."""
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
        self._relay_for_compiled_calls()
        host_memory.unguard(self.eager)  # the graph would trace the hook
        plan = self.backend.quantization if self.options.quantization is not None else None
        # Weights this entry's graphs read, or that choosing its layers reads eagerly, must be on the device.
        wanted = set(plan.layers) if plan is not None else set()
        host_memory.unpark(module for name, module in self._named_modules if name not in wanted)
        if self.options.quantization is None:
            quantization.dequantize(self.eager)  # the unquantized graphs run on eager modules without 8-bit copies
        else:
            self.requantize()

    def requantize(self) -> int:
        """Rewrites, in place, the 8-bit copy of each quantized layer whose weight changed (a fused LoRA, a checkpoint
        loaded into the same module), and quantizes a module object bound for the first time; returns how many layers
        it wrote. Call it after changing weights in place between calls; cheap when nothing changed."""
        plan = self.backend.quantization
        if plan is None:
            return 0
        written = quantization.apply(self.eager, plan, self._attention.modules if self._attention else ())
        self._input_scales_stale |= bool(written) and plan.input_amax is not None
        # A tuple, not the module itself: nn.Module would register a module attribute in the shared _modules.
        largest = plan.input_amax[0] if plan.input_amax else None
        self._witness = (self.eager.get_submodule(plan.layers[0]), largest) if plan.layers else None
        if self.park_weights:
            self._place_full_precision_weights()
        return written

    def _place_full_precision_weights(self) -> None:
        """The quantized layers' full-precision weights: in host memory with ``park_weights`` (copying only what changed
        since they were last there), else on the device. Called whenever the 8-bit copies were brought up to date, and
        by a call that finds the witness layer's weight elsewhere than ``park_weights`` wants it."""
        plan = self.backend.quantization
        layers = [self.eager.get_submodule(name) for name in plan.layers]
        if self.park_weights:
            try:
                moved = host_memory.park(layers)
            except RuntimeError as error:  # page-locked host memory is limited (WSL, small RAM): keep them on the GPU
                log.warning("OneDiff: the full-precision weights stay in GPU memory: no room in page-locked host memory "
                            "(%s); free CPU memory, or turn the setting off", error_summary(error))
                self.park_weights = False
                return
            if moved:
                log.info("OneDiff: %.2f GiB of full-precision weights moved to host memory", moved / 2**30)
        else:
            host_memory.unpark(layers)

    def end_generation(self) -> None:
        """The eager module as eager webui has it: its own layout, and any weight still in host memory brought back on
        its first eager call (``host_memory.guard``)."""
        self.restore_eager_layout()
        host_memory.guard(self.eager)

    def restore_eager_layout(self) -> None:
        """Gives the eager module back its own layout (``channels_last`` re-lays convolution weights): eager calls
        after the generation, or in it after ``run_eagerly``, compute exactly as eager webui's."""
        if self.options.channels_last:
            relay_convolutions(self.eager, torch.contiguous_format)

    def _relay_for_compiled_calls(self) -> None:
        if self.options.channels_last:
            relay_convolutions(self.eager, torch.channels_last)

    def run_eagerly(self, reason: str) -> None:
        """From now on every call runs the eager module; ``reason`` is shown to the user like a compile failure."""
        self.failure = reason
        self.restore_eager_layout()
        host_memory.unpark(self.eager.modules())
        self._compile_ended()

    def forward(self, *args, **kwargs):
        if self.before_call is not None:
            self.before_call()
        if self.failure is None:
            self._refuse_foreign_hooks()
        if self.failure is None and self.options.quantization is not None:
            self._quantize(args, kwargs)
            witness = self._witness[0] if self._witness is not None and self.failure is None else None
            if witness is not None and self.park_weights != host_memory.is_parked(witness):
                self._place_full_precision_weights()
        if self.failure is not None:
            return self.eager(*args, **kwargs)
        graphs_before = self.stats.graphs_compiled
        signature = call_signature(args, kwargs)
        compiled_before = signature in self.stats.call_signatures and not self._value_recompile_allowed
        self._value_recompile_allowed = False
        started, reason, out_of_memory = time.perf_counter(), None, False
        try:
            out = self._call_compiled(args, kwargs, compiled_before=compiled_before)
        except Exception as error:  # noqa: BLE001 -- the call is made again eagerly, which raises what eager raises
            # Dynamo wraps what fails while tracing or inside the backend; anything else came from running a graph
            # (CUDA out of memory in the first replay or a CUDA-graph recording).
            reason = describe_failure(error, type(self.eager), compiling=isinstance(error, DYNAMO_ERRORS))
            out_of_memory = isinstance(getattr(error, "inner_exception", error), torch.OutOfMemoryError)
        if reason is not None:  # after the except block: the error's frames, and the memory they hold, are gone
            log.error("OneDiff: running the UNet eagerly: %s", reason)
            self.run_eagerly(reason)
            if out_of_memory and self.on_out_of_memory is not None:
                self.on_out_of_memory()
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
            reason = foreign_hooks_reason(hooks)
            log.warning("OneDiff: running the UNet eagerly: %s", reason)
            self.run_eagerly(reason)

    def _quantize(self, args, kwargs) -> None:
        """The first call of a structure chooses its layers on its own inputs, before anything is compiled. Later calls
        check one witness layer: a checkpoint loaded in place (a refiner, between two steps) changes every weight.
        After the 8-bit copies were rewritten for changed weights, static input scales are measured again."""
        if self.backend.quantization is None:
            reason = None
            try:
                self.backend.quantization = quantization.plan(
                    self.eager, self.options.quantization, lambda: self.eager(*args, **kwargs))
                log.info("OneDiff: quantizing %d of the UNet's layers in %s", len(self.backend.quantization.layers),
                         self.options.quantization)
            except Exception as error:  # noqa: BLE001 -- the call runs eagerly, with the reason
                reason = (f"choosing the layers to quantize failed ({error_summary(error)}); this generation ran "
                          "eagerly; turn quantization off to compile")
            if reason is not None:
                log.error("OneDiff: running the UNet eagerly: %s", reason)
                self.run_eagerly(reason)
                return
            self.requantize()
            self._input_scales_stale = False  # the plan measured them on this call's weights
            return
        if self._witness is not None and quantization.is_stale(*self._witness):
            self.requantize()
        if self._input_scales_stale:
            self._calibrate(args, kwargs)

    def _calibrate(self, args, kwargs) -> None:
        """Measures the static input scales again on this call's inputs, eagerly (as ``plan`` does), with every weight
        on the device, and rewrites the 8-bit copies whose scale changed."""
        host_memory.unpark(self.eager.modules())
        self.backend.quantization = quantization.calibrated(
            self.backend.quantization, self.eager, lambda: self.eager(*args, **kwargs))
        self.requantize()
        self._input_scales_stale = False  # the copies just written are for the maxima just measured

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
                one_set_of_cudagraph_trees()
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(*args, **kwargs)


def first_line(error: BaseException) -> str:
    """The first line of the error's message ("" for none)."""
    return (str(error).strip().splitlines() or [""])[0]


def error_summary(error: BaseException) -> str:
    """``TypeName: first line of the message``, for one-line reasons."""
    line = first_line(error)
    if len(line) > 200:  # CUDA's out-of-memory message is one line of allocator statistics
        line = line[:200].rstrip() + " ..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def describe_failure(error: BaseException, unet_class: type, *, compiling: bool) -> str:
    """One line for the UI about an error in a compiled call, which then runs eagerly with the rest of the generation.
    ``compiling``: the error came from tracing or compiling ("compile failed: ..."), else from running a graph that
    had compiled ("runtime error in the compiled UNet: ..."). Advice where users can act; where tracing failed in code
    outside the UNet's own, that code is named. Deliberate refusals (``run_eagerly``) are worded by their callers."""
    if not compiling:
        advice = (
            "out of GPU memory: generate at a smaller size or batch, or free GPU memory, for the next one to run compiled"
            if isinstance(error, torch.OutOfMemoryError) else "the next generation tries the compiled UNet again"
        )
        return f"runtime error in the compiled UNet ({error_summary(error)}), this call and the rest ran eagerly; {advice}"
    # A compiler failure's own first line names only the backend object: the compiler's error says what failed.
    shown = error.inner_exception if isinstance(error, torch._dynamo.exc.BackendCompilerFailed) else error
    line = first_line(shown) or type(shown).__name__
    if isinstance(error, torch._dynamo.exc.RecompileError):
        return (
            f"a value the compiled UNet reads changed between calls with inputs of the same shapes "
            f"({value_recompile(error)}): code another extension put in the UNet's path depends on a value that changes "
            "during a generation (a step counter?), which would compile again on every change; turn that extension off "
            "for this generation to compile"
        )
    if isinstance(error, torch._dynamo.exc.FailOnRecompileLimitHit):
        return (
            f"compile failed: this UNet already holds the most compiled graphs allowed ({line}); "
            "generate at fewer distinct sizes, batch sizes or prompt lengths, or restart webui to drop the old graphs"
        )
    where = foreign_frame(error, unet_class)
    if where is not None:
        return (
            f"compile failed in {where}, code another extension put in the UNet's path ({type(error).__name__}: "
            f"{line}); turn that extension off for this generation to compile"
        )
    if isinstance(error, torch._dynamo.exc.Unsupported):
        return (
            f"compile failed: the UNet cannot be captured in one graph ({line}); another extension that patches "
            "the UNet's forward (e.g. ControlNet, hypernetworks) is the usual cause: disable it for this generation"
        )
    return f"compile failed: {error_summary(shown)}"


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
