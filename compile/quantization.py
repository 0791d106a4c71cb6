"""8-bit weights and activations for the UNet's large matrix multiplies (the "Model Quantization" checkbox).

Which layers: only the ``Linear`` layers inside the transformer blocks (attention projections, feed-forward, and the
transformers' ``proj_in``/``proj_out`` where they are Linears), which hold most of the weights (SDXL: 2.2 of 2.6 billion)
and see many rows per call (one per image token, or per text token). Convolutions, the time and label embeddings and
the residual blocks' embedding projections see one row per image and stay in the model's precision. Among the
candidates, ``measure_errors`` runs real calls and ``choose_layers`` keeps out each layer whose own output moves too
far when quantized.

How: each chosen layer gets non-persistent buffers beside its weight (``BUFFERS``): the 8-bit weight, its scale per
output channel, and for static fp8 input scales (``Quantization.input_amax``) the input's scale. The weight itself
stays the master: webui loads checkpoints and fuses LoRAs into it, and ``apply`` writes the 8-bit copy again *into
the same buffers*, so compiled graphs and CUDA-graph recordings that read them need no recompile; it rewrites only
the layers whose weight changed since their copy was written (``weight_source``: the tensor, its address and its
in-place version counter). ``quantized_linear`` is the forward the compiled UNet runs for such a layer.

Packs: where an attention module's projections that read the same input are all quantized (q, k and v of a
self-attention, k and v of a cross-attention, which read the text), their 8-bit weights are written into one tensor on
the attention module (``PACKED_BUFFERS``) with one weight scale (int8: one per output channel, as alone; fp8: one for
the pack, the largest member's) and one input scale (fp8: from the largest member's input maximum), and each member's
buffers are views into it. ``projections`` then computes them in one GEMM from one quantized input: fewer, larger GEMMs
and kernels per call. Only for attention modules whose forward calls ``projections`` in compiled calls (the engine's
``sdpa_forward``): anything else calling the members alone would give a graph views of one tensor as inputs of their
own, which Dynamo refuses in a compiled region. A pack is written as a whole when any member's weight changed.

Formats:

- ``int8`` (``torch._int_mm``, int32 accumulation; CUDA compute capability 8.0 and newer, and the CPU): each row of the
  input is scaled by its own absolute maximum, computed on every call (the compiler fuses it into the kernel that
  produced the input), the weight per output channel; one 8-bit GEMM, then both scales and the bias.
- ``fp8`` (e4m3, ``torch._scaled_mm``; compute capability 8.9 and newer): static scales, one per tensor. The input's
  comes from the largest value the layer saw in an eager call (``plan``, and ``calibrated`` after the weights
  changed), so quantizing it is elementwise and fused into the kernel that produces it; cuBLAS's fp8 GEMM then writes
  the model's dtype with the bias in its epilogue, accumulating fast (``FP8_FAST_ACCUM``): faster than dynamic row-wise
  scales at the same error (README, Quantization).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch

QUANTIZED_WEIGHT = "onediff_quantized_weight"
WEIGHT_SCALE = "onediff_weight_scale"
INPUT_SCALE = "onediff_input_scale"
INPUT_MARGIN = 2.0
"""Static input scales cover this multiple of the largest input value seen while calibrating (later steps, prompts
and seeds reach further). fp8's exponent keeps small values' relative precision, so the margin costs little."""
LAYER_BUFFERS = (QUANTIZED_WEIGHT, WEIGHT_SCALE, INPUT_SCALE)
PACKED_BUFFERS = ("onediff_packed_weight", "onediff_packed_weight_scale", "onediff_packed_input_scale")
"""An attention module's buffers holding its projections' pack: the 8-bit weights [sum of outputs, in], their scale,
and (fp8) the input's scale."""
BUFFERS = frozenset(LAYER_BUFFERS + PACKED_BUFFERS)
PACKED = "onediff_packed"
"""An attention module's attribute while it holds a pack: the names of the projections in it, in the pack's order."""
PROJECTION_PACKS = (("to_q", "to_k", "to_v"), ("to_k", "to_v"))
"""Projections of one attention module that read the same input (k and v read the context, q too in a self-attention),
packed where all of them are quantized, the first that fits."""
OUTPUT_DTYPE = "onediff_output_dtype"
"""A quantized layer's attribute: its weight's dtype, which its output has. Kept beside the weight so that the compiled
graph never reads the weight itself: Dynamo would guard on it (its device, dtype and layout), and a full-precision
weight that moved (to host memory, to save GPU memory) would then make the graph compile again."""
QUANTIZED_FROM = "onediff_quantized_from"
"""A quantized layer's attribute: what its 8-bit copy was written from, ``weight_source`` and the static input
maximum (None: per-row input scales)."""
FORMATS = ("int8", "fp8")
MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}
TRANSFORMER_BLOCKS = frozenset({"BasicTransformerBlock", "SpatialTransformer", "SpatialVideoTransformer"})
MIN_ROWS = 17
"""``torch._int_mm`` needs more than 16 rows; every candidate sees at least one row per text token (77 and more)."""
FP8_FAST_ACCUM = True
"""Whether fp8 GEMMs with static input scales use fast accumulation (``use_fast_accum``: Hopper's tensor cores then skip
the periodic promotion of partial sums to fp32): measured faster on Hopper at the same error (README, Quantization).
Read when a graph is traced."""
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What to quantize: the format and the qualified names of the layers."""

    format: str
    layers: tuple[str, ...]
    input_amax: tuple[float, ...] | None = None
    """fp8 only: each layer's largest input value seen while calibrating, for a static input scale (``INPUT_MARGIN``):
    the input's quantization is then elementwise, which the compiler fuses into the kernel that produces the input,
    and the GEMM is cuBLAS's per-tensor fp8 GEMM writing the model's dtype with the bias in its epilogue. None: each
    input row is scaled by its own maximum, computed on every call."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"quantization format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.input_amax is not None and (self.format != "fp8" or len(self.input_amax) != len(self.layers)):
            raise ValueError("static input scales are for fp8 and need one value per layer")


def unsupported_reason(format: str, device: torch.device) -> str | None:
    """Why ``format`` cannot run on ``device`` (None: it can), in words for the UI."""
    if device.type == "cpu":
        return None if format == "int8" else f"{format} quantization needs an NVIDIA GPU of compute capability 8.9 or newer"
    if device.type != "cuda":
        return f"{format} quantization runs on NVIDIA GPUs only, not on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    needed = MIN_CAPABILITY[format]
    if capability < needed:
        name = torch.cuda.get_device_name(device)
        return (f"{format} quantization needs compute capability {needed[0]}.{needed[1]} or newer; "
                f"this {name} has {capability[0]}.{capability[1]}")
    return None


def auto_format(device: torch.device, sdxl: bool) -> str | None:
    """The format "auto" picks, None for none. SDXL-family UNets: fp8 from compute capability 8.9 (Ada, Hopper,
    Blackwell), which measured fastest on Hopper, else int8 (Ampere, the CPU). SD1.x and SD2.x (``sdxl`` False) stay
    unquantized: SD1.5's GEMMs at 512 are too small for 8 bits to gain (README, Quantization; SD2.x not measured)."""
    if not sdxl:
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY["fp8"]:
        return "fp8"
    return "int8"


def candidate_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linears inside transformer blocks whose shapes the 8-bit kernels take (both sides multiples of 16)."""
    inside: set[str] = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in TRANSFORMER_BLOCKS:
            inside.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
    return {
        name: module for name, module in unet.named_modules()
        if name in inside and isinstance(module, torch.nn.Linear)
        and module.in_features % 16 == 0 and module.out_features % 16 == 0
    }


def quantize_weight(weight: torch.Tensor, format: str, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: (8-bit weight [out, in], float32 scale [out], or [] with ``per_tensor``)."""
    w = weight.detach().float()
    limit = _INT8_MAX if format == "int8" else _FP8_MAX
    scale = (w.abs().amax() if per_tensor else w.abs().amax(dim=1)).clamp(min=1e-12) / limit
    return _to_8bit(w / (scale if per_tensor else scale[:, None]), format), scale


def quantize_rows(x: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D activation: (8-bit rows, float32 scale [rows, 1])."""
    xf = x.float()
    limit = _INT8_MAX if format == "int8" else _FP8_MAX
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / limit
    return _to_8bit(xf / scale, format), scale


def _to_8bit(scaled: torch.Tensor, format: str) -> torch.Tensor:
    """Values already scaled to the format's range, rounded (int8) and saturated into it."""
    if format == "int8":
        return scaled.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return scaled.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` given 8-bit (``weight`` [out, in], ``weight_scale`` [out] or []) and ``x``
    quantized here, per row, or with the static ``input_scale`` (fp8); returns ``out_dtype``."""
    rows = x.reshape(-1, x.shape[-1])
    format = "int8" if weight.dtype == torch.int8 else "fp8"
    if input_scale is not None:
        quantized = _to_8bit(rows.float() / input_scale, format)
        out = torch._scaled_mm(quantized, weight.t(), scale_a=input_scale, scale_b=weight_scale,
                               bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                               use_fast_accum=FP8_FAST_ACCUM)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    quantized, row_scale = quantize_rows(rows, format)
    if format == "int8":
        out = torch._int_mm(quantized, weight.t()).float() * row_scale * weight_scale
    else:
        # row-wise scaled fp8 GEMMs write bfloat16 (cuBLAS has no float16 output for them)
        out = torch._scaled_mm(quantized, weight.t(), scale_a=row_scale, scale_b=weight_scale[None, :],
                               out_dtype=torch.bfloat16)
    out = out.to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def is_quantized(layer: torch.nn.Module) -> bool:
    return QUANTIZED_WEIGHT in layer._buffers


def quantized_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a quantized layer: its output in the weight's own dtype (the model's precision), read from
    ``OUTPUT_DTYPE``, not from the weight."""
    return quantized_matmul(x, layer._buffers[QUANTIZED_WEIGHT], layer._buffers[WEIGHT_SCALE], layer.bias,
                            getattr(layer, OUTPUT_DTYPE), layer._buffers.get(INPUT_SCALE))


def weight_source(weight: torch.Tensor) -> tuple:
    """Changes whenever the weight's values may have: another tensor, other memory, or an in-place write (a checkpoint
    loaded into it, a LoRA fused into it: every in-place operation bumps ``_version``, also under ``no_grad``)."""
    return id(weight), weight.data_ptr(), weight._version


def replace_weight_data(layer: torch.nn.Module, data: torch.Tensor) -> None:
    """Gives the layer's weight ``data``, the same values in other memory (host memory, ``compile/host_memory.py``),
    keeping its 8-bit copy current if it was."""
    written_from = layer.__dict__.get(QUANTIZED_FROM)
    current = written_from is not None and written_from[0] == weight_source(layer.weight)
    layer.weight.data = data
    if current:
        layer.__dict__[QUANTIZED_FROM] = (weight_source(layer.weight), written_from[1])


def is_stale(layer: torch.nn.Module, input_amax: float | None = None) -> bool:
    """Whether the layer's 8-bit copy is missing, or was written from a weight that changed since or for another static
    input maximum (``Quantization.input_amax``)."""
    return not is_quantized(layer) or layer.__dict__.get(QUANTIZED_FROM) != (weight_source(layer.weight), input_amax)


def _write(owner: torch.nn.Module, members: tuple[str, ...], amax: list[float | None], format: str) -> None:
    """Writes the 8-bit weight of one GEMM into ``owner``'s buffers, in place where they exist with the same layout:
    a layer's own (``owner`` is the layer, ``members`` empty), or a pack of an attention module's projections
    (``owner`` is the module, ``members`` the names of its projections in order, which get views into the pack)."""
    packed = bool(members)
    layers = [getattr(owner, member) for member in members] if packed else [owner]
    names = PACKED_BUFFERS if packed else LAYER_BUFFERS
    static = amax[0] is not None
    with torch.no_grad():
        copy = owner._buffers.get(names[0])
        # Where the 8-bit copy lives: a weight may be waiting in host memory (compile/host_memory.py).
        sources = [layer.weight if copy is None else layer.weight.to(copy.device, non_blocking=True) for layer in layers]
        weight, scale = quantize_weight(torch.cat(sources) if packed else sources[0], format, per_tensor=static)
        wanted = {names[0]: weight, names[1]: scale}
        if static:
            wanted[names[2]] = torch.tensor(_input_scale(max(amax)), device=weight.device)
        _write_buffers(owner, wanted, drop=() if static else names[2:])
        if packed:
            owner.__dict__[PACKED] = members
            owner.__dict__[OUTPUT_DTYPE] = layers[0].weight.dtype
            held = [owner._buffers[name] for name in names if name in owner._buffers]
            start = 0
            for layer in layers:
                rows = slice(start, start + layer.out_features)
                start = rows.stop
                views = dict(zip(LAYER_BUFFERS, (held[0][rows], held[1] if static else held[1][rows], *held[2:])))
                _write_buffers(layer, views, drop=LAYER_BUFFERS[len(views):], alias=True)
        for layer, largest in zip(layers, amax):
            layer.__dict__[QUANTIZED_FROM] = (weight_source(layer.weight), largest)
            layer.__dict__[OUTPUT_DTYPE] = layer.weight.dtype


def _write_buffers(module: torch.nn.Module, wanted: dict[str, torch.Tensor], drop: Iterable[str] = (),
                   alias: bool = False) -> None:
    """Each buffer of ``wanted`` copied into the one ``module`` holds where its layout is the same, else registered;
    ``alias``: ``wanted`` are views, registered unless the buffer held is the same view already."""
    for name, value in wanted.items():
        held = module._buffers.get(name)
        same_layout = held is not None and (held.dtype, held.shape, held.device) == (value.dtype, value.shape, value.device)
        if same_layout and not alias:
            held.copy_(value)
        elif not (same_layout and held.data_ptr() == value.data_ptr()):
            module.register_buffer(name, value, persistent=False)
    for name in drop:
        module._buffers.pop(name, None)


def dequantize(unet: torch.nn.Module) -> int:
    """Drops every 8-bit copy from ``unet``, packs too; returns how many layers had one."""
    modules = list(unet.modules())
    count = sum(map(is_quantized, modules))
    for module in modules:
        _drop_pack(module)
        _drop_buffers(module)
    return count


def _drop_buffers(layer: torch.nn.Module) -> None:
    for name in LAYER_BUFFERS:
        layer._buffers.pop(name, None)
    layer.__dict__.pop(QUANTIZED_FROM, None)
    layer.__dict__.pop(OUTPUT_DTYPE, None)


def _drop_pack(module: torch.nn.Module) -> None:
    """Drops ``module``'s pack, if it holds one, and its members' views into it."""
    members = module.__dict__.pop(PACKED, None)
    if members is None:
        return
    for name in PACKED_BUFFERS:
        module._buffers.pop(name, None)
    module.__dict__.pop(OUTPUT_DTYPE, None)
    for member in members:
        _drop_buffers(getattr(module, member))


def projection_packs(unet: torch.nn.Module, layers: Iterable[str],
                     attention: Iterable[torch.nn.Module]) -> dict[str, tuple[str, ...]]:
    """The modules among ``attention`` whose projections among ``layers`` make a pack (``PROJECTION_PACKS``: all
    members quantized, without bias, of one input width), by name in ``unet``, each with its members."""
    chosen, attention = set(layers), set(attention)
    packs = {}
    for name, module in unet.named_modules():
        if module not in attention:
            continue
        prefix = f"{name}." if name else ""
        for members in PROJECTION_PACKS:
            linears = [getattr(module, member, None) for member in members]
            if (all(f"{prefix}{member}" in chosen for member in members)
                    and all(isinstance(linear, torch.nn.Linear) and linear.bias is None for linear in linears)
                    and len({linear.in_features for linear in linears}) == 1):
                packs[name] = members
                break
    return packs


def apply(unet: torch.nn.Module, quantization: Quantization, attention: Iterable[torch.nn.Module] = ()) -> int:
    """Makes exactly ``quantization.layers`` quantized in ``unet`` (others lose their 8-bit copies), packed in the
    modules among ``attention`` whose forward calls ``projections`` in compiled calls (``projection_packs``), writing
    the copy of each layer, or pack, that has none or whose weight changed since (``is_stale``), in place where it had
    one (same buffers, same addresses: graphs and CUDA-graph recordings stay valid); returns how many layers it wrote.
    Cheap when nothing changed: call it whenever the weights may have (a generation starts, a LoRA was fused)."""
    named = dict(unet.named_modules())
    wanted = dict(zip(quantization.layers, quantization.input_amax or [None] * len(quantization.layers)))
    dtype = _dtype(quantization.format)
    packs = projection_packs(unet, wanted, attention)
    for name, module in named.items():
        if PACKED in module.__dict__ and (packs.get(name) != module.__dict__[PACKED]
                                          or module._buffers[PACKED_BUFFERS[0]].dtype != dtype):
            _drop_pack(module)
    for name, module in named.items():
        if is_quantized(module) and (name not in wanted or module._buffers[QUANTIZED_WEIGHT].dtype != dtype):
            _drop_buffers(module)
    units = {owner: ([f"{owner}.{member}" if owner else member for member in members], members)
             for owner, members in packs.items()}
    in_packs = {name for names, _ in units.values() for name in names}
    units.update((name, ([name], ())) for name in wanted if name not in in_packs)
    written = 0
    for owner, (names, members) in units.items():
        if any(is_stale(named[name], wanted[name]) for name in names) or (
                members and PACKED not in named[owner].__dict__):
            _write(named[owner], members, [wanted[name] for name in names], quantization.format)
            written += len(names)
    return written


def _packed_linear(attention: torch.nn.Module, x: torch.Tensor, members: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    """The outputs of ``attention``'s packed projections ``members`` (all: the pack's order) for their shared input
    ``x``, from one 8-bit GEMM over their rows of the pack, sliced inside the graph: views of one pack given to a
    graph as inputs of their own would alias, which Dynamo refuses in a compiled region."""
    sizes = [getattr(attention, name).out_features for name in getattr(attention, PACKED)]
    start = sum(sizes[:members.start or 0])
    stop = start + sum(sizes[members])
    buffers = attention._buffers
    weight, scale = buffers[PACKED_BUFFERS[0]], buffers[PACKED_BUFFERS[1]]
    if stop - start != weight.shape[0]:
        weight, scale = weight[start:stop], scale if scale.dim() == 0 else scale[start:stop]
    out = quantized_matmul(x, weight, scale, None, getattr(attention, OUTPUT_DTYPE), buffers.get(PACKED_BUFFERS[2]))
    return out.split(sizes[members], dim=-1)


def projections(attention: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None):
    """``to_q(x)``, ``to_k(context)`` and ``to_v(context)`` of an attention module (no context: a self-attention, on
    ``x``), with one GEMM for the members of its pack (``PACKED``) that read the same input."""
    packed = getattr(attention, PACKED) if PACKED_BUFFERS[0] in attention._buffers else ()
    if len(packed) == 3 and context is None:
        return _packed_linear(attention, x)
    context = x if context is None else context
    if len(packed) == 3:  # q, k and v of one width, but a cross-attention: q on x, k and v on the context
        return (*_packed_linear(attention, x, slice(0, 1)), *_packed_linear(attention, context, slice(1, 3)))
    if len(packed) == 2:
        return (attention.to_q(x), *_packed_linear(attention, context))
    return attention.to_q(x), attention.to_k(context), attention.to_v(context)


def _dtype(format: str) -> torch.dtype:
    return torch.int8 if format == "int8" else torch.float8_e4m3fn


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return ((approx.float() - exact).norm() / exact.norm().clamp(min=1e-12)).item()


def each_input(layers: Mapping[str, torch.nn.Linear], run: Callable[[], object],
                record: Callable[[str, torch.nn.Linear, torch.Tensor, torch.Tensor], None]) -> None:
    """Calls ``record(name, layer, input, output)`` for every call of each layer while ``run()`` runs, unquantized."""
    def hook(name):
        return lambda layer, inputs, output: record(name, layer, inputs[0], output)

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


def input_maxima(layers: Mapping[str, torch.nn.Linear], run: Callable[[], object]) -> dict[str, float]:
    """Each layer's largest absolute input value while ``run()`` calls the model."""
    maxima = dict.fromkeys(layers, 0.0)

    def record(name, layer, x, output):
        maxima[name] = max(maxima[name], x.detach().abs().amax().item())

    each_input(layers, run, record)
    return maxima


def measure_errors(layers: Mapping[str, torch.nn.Linear], format: str, run: Callable[[], object],
                   input_amax: dict[str, float] | None = None) -> dict[str, float]:
    """Each layer's own sensitivity: while ``run()`` calls the model (eagerly, unquantized), every layer's output is
    compared with what the quantized layer would give for the same input (int8: per-row input scales; fp8: static
    scales, the input's taken from this input); the worst relative error over the calls. ``input_amax``, if given,
    receives each layer's largest absolute input value."""
    errors = dict.fromkeys(layers, 0.0)

    def record(name, layer, x, output):
        largest = x.detach().abs().amax().item()
        if input_amax is not None:
            input_amax[name] = max(input_amax.get(name, 0.0), largest)
        if x.reshape(-1, x.shape[-1]).shape[0] < MIN_ROWS:
            errors[name] = float("inf")  # the 8-bit kernel cannot take it
            return
        static = format == "fp8"
        weight, scale = quantize_weight(layer.weight, format, per_tensor=static)
        input_scale = torch.tensor(_input_scale(largest), device=x.device) if static else None
        approx = quantized_matmul(x, weight, scale.to(x.device), layer.bias, output.dtype, input_scale)
        errors[name] = max(errors[name], relative_error(approx, output))

    each_input(layers, run, record)
    return errors


def _input_scale(largest: float) -> float:
    return max(largest, 1e-6) * INPUT_MARGIN / _FP8_MAX


DEFAULT_THRESHOLDS = {"int8": 0.02, "fp8": 0.06}
"""A layer whose own output moves further than this when quantized stays in the model's precision. Typical errors
with row- and channel-wise scales: int8 about 0.01, fp8 e4m3 (3 mantissa bits) about 0.03; a layer well above them has
outliers that one scale per row or channel cannot resolve."""


def choose_layers(errors: Mapping[str, float], threshold: float) -> tuple[str, ...]:
    return tuple(name for name, error in errors.items() if error <= threshold)


def plan(unet: torch.nn.Module, format: str, run: Callable[[], object]) -> Quantization:
    """The layers of ``unet`` to quantize in ``format``: the candidates whose own error, measured while ``run()`` calls
    ``unet`` eagerly once, is within ``DEFAULT_THRESHOLDS[format]``; for fp8 with the static input maxima of that call."""
    maxima: dict[str, float] = {}
    errors = measure_errors(candidate_layers(unet), format, run, maxima)
    layers = choose_layers(errors, DEFAULT_THRESHOLDS[format])
    return Quantization(format, layers, tuple(maxima[name] for name in layers) if format == "fp8" else None)


def calibrated(quantization: Quantization, unet: torch.nn.Module, run: Callable[[], object]) -> Quantization:
    """``quantization`` with its static input maxima measured again while ``run()`` calls ``unet`` eagerly (its weights
    changed: another checkpoint, a LoRA); the same layers."""
    if quantization.input_amax is None:
        return quantization
    maxima = input_maxima({name: unet.get_submodule(name) for name in quantization.layers}, run)
    return dataclasses.replace(quantization, input_amax=tuple(maxima[name] for name in quantization.layers))
