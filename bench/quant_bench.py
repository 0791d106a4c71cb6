"""Quantization benchmark at UNet level: eager fp16, compiled fp16 and compiled 8-bit, same process, same card; one table.

    python bench/quant_bench.py                             # SDXL 1024 and SD1.5 512, int8 and fp8, on the GPU
    python bench/quant_bench.py --tiny --device cpu --variants int8   # CPU smoke run
    python bench/quant_bench.py --models sdxl --variants fp8-static fp8-static-fast-accum --profile --repeat 20
    python bench/quant_bench.py --park              # also with full-precision weights in host memory: GPU memory, time
    python bench/quant_bench.py --gemms --variants  # only the candidate layers' GEMMs, one table: the ceiling
    python bench/quant_bench.py --models sdxl --variants fp8-static-fast-accum --host-timeline  # host time before the GPU
    python bench/quant_bench.py --models sdxl --variants fp8-static-fast-accum --host-timeline --unquantized-last

For each format: every candidate layer's own error is measured on the call's inputs (``measure_errors``), the layers
within the threshold are quantized, and the compiled UNet runs them in 8 bits. Error: ||out - eager fp16|| / ||eager
fp16|| over the UNet's output. Time: ``compiled_ms`` is one call with the GPU idle at its start, so the host's work
before the GPU starts adds to the GPU's; ``loop_ms`` is per call of calls made back to back, as a sampler makes them,
where the host's work overlaps the previous call's GPU work (``unet_bench.loop_ms``). Weights: GiB the UNet's weights
take on the device with fp16 masters beside the 8-bit copies, and without them (the masters of quantized layers held
elsewhere).

``--profile``: after each variant's timing, ``--profile-calls`` compiled calls run under ``torch.profiler`` and one table
prints at once: CUDA time per call by category of kernel (8-bit GEMMs, fp16/bf16 GEMMs, attention, convolutions,
Inductor's Triton kernels, copies...; the rules are in ``bench/kernel_profile.py``) and the costliest kernels; at the end
one line per variant puts the categories side by side. On the CPU the profile reads operators' CPU time (a smoke run).

``--gemms``: before the UNet variants, the candidate layers' GEMMs alone, on random data of the shapes one call gives
them (rows, in, out), each shape timed with cuBLAS in every precision: fp16 ``linear``, int8 ``_int_mm``, fp8 with
row-wise scales, fp8 with per-tensor scales (as static input scales give) with and without fast accumulation. Summed
over the call's layers: what the GEMMs cost and the most 8 bits could save, before quantizing the inputs.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import runpy
import statistics
from pathlib import Path
from typing import Callable

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import kernel_profile as kp  # noqa: E402
from sd_webui_onediff.bench import unet_bench as ub  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet, CompileOptions  # noqa: E402
from sd_webui_onediff.compile import host_memory  # noqa: E402
from sd_webui_onediff.compile import quantization as q  # noqa: E402
from sd_webui_onediff.compile.attention import SdpaAttention  # noqa: E402


def weights_gib(unet: torch.nn.Module, *, masters_of_quantized: bool) -> float:
    """Each storage once: the members of a pack hold views into it (``quantization.PACKED_BUFFERS``)."""
    storages = {}
    for module in unet.modules():
        quantized = q.is_quantized(module)
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or (quantized and name == "weight" and not masters_of_quantized):
                continue
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values()) / 2**30


def allocated_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device) / 2**30


def parked(unet: torch.nn.Module, run_compiled, out, device: torch.device, repeat: int) -> dict:
    """``--park``: the quantized layers' full-precision weights moved to host memory (``compile/host_memory.park``, as
    the engine does with the setting on): GPU memory allocated before and after, the seconds of that first move (page-
    locked copies), ms per call then (same graph: it reads only the 8-bit copies), the error against the unparked
    call's output, and the seconds of bringing them back (an eager use) and of parking them again unchanged (no copy)."""
    layers = [module for module in unet.modules() if q.is_quantized(module)]
    before = allocated_gib(device)
    try:
        moved, park_s = ub.wall_seconds(lambda: host_memory.park(layers), device)
        after = allocated_gib(device)
        parked_out = run_compiled()
        ms = ub.timed_ms(run_compiled, device, repeat)
        back_s = ub.wall_seconds(lambda: host_memory.unpark(layers), device)[1]
        again_s = ub.wall_seconds(lambda: host_memory.park(layers), device)[1]
    finally:
        host_memory.unpark(unet.modules())
    return {"allocated_gib": before, "allocated_gib_parked": after, "parked_gib": moved / 2**30, "park_s": park_s,
            "parked_ms": ms, "parked_err_vs_unparked": ub.relative_error(parked_out, out), "unpark_s": back_s,
            "repark_s": again_s}


def host_ms(fn, device: torch.device, repeat: int) -> float:
    """Median milliseconds the host spends in one call before it returns, the GPU idle at its start: where this
    reaches the call's device time, the host (Python, guards, launches), not the GPU, sets the pace."""
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(ub.wall_seconds(fn, torch.device("cpu"))[1] * 1e3)
    return statistics.median(samples)


def host_profile(fn, calls: int, top: int = 14) -> str:
    """``--host-profile``: where the host's time in ``calls`` calls goes, by Python function (cProfile, own time)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


TIMELINE = ("to_launch_ms", "launch_ms", "to_gpu_ms", "returns_ms")
"""``--host-timeline``'s columns (``kernel_profile.host_timeline``)."""


def text_rows(rows: int, k: int, n: int) -> bool:
    """A GEMM over the prompt's tokens (cross-attention's ``to_k``/``to_v``: 154 rows for SDXL at batch 2): too small
    to gain from 8 bits, and each needs its own kernel to quantize its input."""
    return rows < 512


def small_gemm(rows: int, k: int, n: int) -> bool:
    """A GEMM with less work than SDXL's feed-forward ones (attention projections at 2048x1280x1280, 8192x640x640)."""
    return rows * k * n < 2048 * 1280 * 2560


@dataclasses.dataclass(frozen=True)
class Variant:
    format: str | None
    inductor: dict = dataclasses.field(default_factory=dict)
    """Inductor config patches while it compiles."""
    static: bool = False
    """fp8 with static input scales (``Quantization.input_amax``)."""
    fast_accum: bool = False
    """``quantization.FP8_FAST_ACCUM`` while the graph is traced."""
    keep: Callable[[int, int, int], bool] | None = None
    """Layers whose GEMM (rows, in, out) this returns True for stay unquantized, whatever their error."""
    packed: bool = True
    """Projections reading one input packed into one GEMM (``quantization.projection_packs``), as the engine does."""


VARIANTS = {
    "int8": Variant("int8"),
    "fp8": Variant("fp8"),
    "int8-fused-mul": Variant("int8", {"force_fuse_int_mm_with_mul": True}),
    "fp8-static": Variant("fp8", static=True),
    "fp8-static-fast-accum": Variant("fp8", static=True, fast_accum=True),
    "fp8-static-fast-accum-unpacked": Variant("fp8", static=True, fast_accum=True, packed=False),
    "fp8-static-fast-accum-text-fp16": Variant("fp8", static=True, fast_accum=True, keep=text_rows),
    "fp8-static-fast-accum-small-fp16": Variant("fp8", static=True, fast_accum=True,
                                                keep=lambda *gemm: text_rows(*gemm) or small_gemm(*gemm)),
}


def layer_gemms(candidates: dict[str, torch.nn.Linear], run) -> dict[str, tuple[int, int, int]]:
    """Each candidate's GEMM (rows, in, out) in one ``run()``."""
    gemms = {}

    def record(name, layer, x, output):
        gemms[name] = (x.reshape(-1, layer.in_features).shape[0], layer.in_features, layer.out_features)

    q.each_input(candidates, run, record)
    return gemms


def gemm_rows(shapes: dict[tuple[int, int, int], int], device: torch.device, repeat: int) -> list[dict]:
    """``--gemms``: each shape's GEMM timed alone in each precision, ms per GEMM; a last row sums one call's."""
    fp8 = q.unsupported_reason("fp8", device) is None
    rows = []
    for (m, k, n), count in sorted(shapes.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2] * item[1]):
        x = torch.randn(m, k, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        w = torch.randn(n, k, device=device, dtype=x.dtype) / k**0.5
        bias = torch.randn(n, device=device, dtype=x.dtype)
        exact = torch.nn.functional.linear(x, w, bias)
        row = {"rows": m, "in": k, "out": n, "layers": count,
               "fp16_ms": ub.timed_ms(lambda: torch.nn.functional.linear(x, w, bias), device, repeat)}
        xi = q.quantize_rows(x, "int8")[0]
        wi = q.quantize_weight(w, "int8")[0]
        row["int8_ms"] = ub.timed_ms(lambda: torch._int_mm(xi, wi.t()), device, repeat)
        if fp8:
            xr, rs = q.quantize_rows(x, "fp8")
            wr, wrs = q.quantize_weight(w, "fp8")
            row["fp8_rowwise_ms"] = ub.timed_ms(lambda: torch._scaled_mm(
                xr, wr.t(), scale_a=rs, scale_b=wrs[None, :], out_dtype=torch.bfloat16), device, repeat)
            wt, wts = q.quantize_weight(w, "fp8", per_tensor=True)
            xt, xts = q.quantize_weight(x, "fp8", per_tensor=True)  # one scale for the input, as a static one
            for label, fast in (("fp8_tensor_ms", False), ("fp8_tensor_fast_ms", True)):
                def tensor_mm(fast=fast):
                    return torch._scaled_mm(xt, wt.t(), scale_a=xts, scale_b=wts, bias=bias, out_dtype=x.dtype,
                                            use_fast_accum=fast)
                row[label] = ub.timed_ms(tensor_mm, device, repeat)
                row[label.replace("_ms", "_err")] = ub.relative_error(tensor_mm(), exact)
        rows.append(row)
        print(json.dumps(row), flush=True)
    totals = {"rows": "per call", "in": "", "out": "", "layers": sum(shapes.values())}
    for key in rows[0] if rows else ():
        if key.endswith("_ms"):
            totals[key] = sum(row[key] * row["layers"] for row in rows)
    return rows + [totals]


def run_case(name: str, args, device: torch.device) -> list[dict]:
    build, full, tiny, make_inputs, latent = ub.CASES[name]
    config = tiny if args.tiny else full
    latent = 16 if args.tiny else latent
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build(config).to(device).to(dtype)
    inputs, kwargs = ub.on_device(*make_inputs(config, batch=2, latent=latent), device)
    autocast = ub.fp16_autocast(device)
    sdp = SdpaAttention(unet, upcast=False)

    def eager():
        with autocast, sdp.installed():
            return unet(*inputs, **kwargs)

    rows = []
    with torch.no_grad():
        eager_out = eager()
        eager_ms = ub.timed_ms(eager, device, args.repeat)
        candidates = q.candidate_layers(unet)
        shapes = layer_gemms(candidates, eager) if args.gemms or any(VARIANTS[v].keep for v in args.variants) else {}
        if args.gemms:
            gemms = gemm_rows(collections.Counter(shapes.values()), device, args.repeat)
            print(f"\n{name}: the candidate layers' GEMMs alone, ms (random data of one call's shapes)")
            print(ub.markdown_table(gemms, [(c, "{}") for c in ("rows", "in", "out", "layers")] + [
                (c, "{:.3f}" if c.endswith("_ms") else "{:.1e}") for c in gemms[0] if c.endswith(("_ms", "_err"))]),
                flush=True)
        quantized, baseline = [(v, VARIANTS[v]) for v in args.variants], [("unquantized", Variant(None))]
        variants = quantized + baseline if args.unquantized_last else baseline + quantized
        for label, variant in variants:
            format = variant.format
            chosen, errors, amax = (), {}, {}
            if format is not None:
                reason = q.unsupported_reason(format, device)
                if reason:
                    print(f"{name} {label}: {reason}")
                    continue
                errors = q.measure_errors(candidates, format, eager, amax)
                chosen = q.choose_layers(errors, args.threshold or q.DEFAULT_THRESHOLDS[format])
                if variant.keep is not None:
                    chosen = tuple(n for n in chosen if not variant.keep(*shapes[n]))
                q.apply(unet, q.Quantization(format, chosen, tuple(amax[n] for n in chosen) if variant.static else None),
                        sdp.modules if variant.packed else ())
            compiled = CompiledUNet(unet, args.options)

            def run_compiled():
                with autocast:
                    return compiled(*inputs, **kwargs)

            q.FP8_FAST_ACCUM = variant.fast_accum  # read while tracing: a graph keeps the value it was compiled with
            with torch._inductor.config.patch(variant.inductor):
                out, compile_s = ub.wall_seconds(run_compiled, device)
            if compiled.failure:
                print(f"{name} {label}: {compiled.failure}")
                q.dequantize(unet)
                continue
            ms = ub.timed_ms(run_compiled, device, args.repeat)
            finite = sorted(e for e in errors.values() if e != float("inf"))
            rows.append({
                "model": name + (" tiny" if args.tiny else ""), "shape": f"2x4x{latent}x{latent}", "variant": label,
                "layers": f"{len(chosen)}/{len(candidates)}" if format else "-",
                "layer_err_median": statistics.median(finite) if finite else float("nan"),
                "layer_err_max": finite[-1] if finite else float("nan"),
                "eager_ms": eager_ms, "compiled_ms": ms,
                "vs_fp16_compiled": None, "err_vs_eager": ub.relative_error(out, eager_out), "compile_s": compile_s,
                "weights_gib": weights_gib(unet, masters_of_quantized=True),
                "weights_gib_no_masters": weights_gib(unet, masters_of_quantized=False),
                "peak_gib": ub.peak_gib(run_compiled, device),
            })
            rows[-1]["host_ms"] = host_ms(run_compiled, device, args.repeat)
            rows[-1]["loop_ms"] = ub.loop_ms(run_compiled, device, args.repeat)
            if args.park and format is not None:
                rows[-1].update(parked(unet, run_compiled, out, device, args.repeat))
            print(json.dumps(rows[-1]), flush=True)  # a run cut short by a timeout still leaves its rows
            if args.host_timeline and device.type == "cuda":
                try:
                    rows[-1].update(kp.host_timeline(run_compiled, args.profile_calls))
                    rows[-1].update(kp.host_phases(compiled, run_compiled, args.repeat))
                    print(json.dumps({key: rows[-1][key] for key in TIMELINE + kp.PHASES}), flush=True)
                except Exception as error:  # a profiler failure costs the timeline, not the other variants
                    print(f"{name} {label}: host timeline failed: {type(error).__name__}: {error}", flush=True)
            if args.host_profile:
                print(f"\n{name} {label}: host time of {args.profile_calls} compiled calls by function\n"
                      + host_profile(run_compiled, args.profile_calls), flush=True)
            if args.profile:
                try:
                    rows[-1]["profile"] = kp.profile_calls(run_compiled, device, args.profile_calls)
                    print("\n" + kp.profile_table(rows[-1]["profile"], f"{rows[-1]['model']} {label}") + "\n", flush=True)
                except Exception as error:  # a profiler failure costs the profile, not the other variants
                    print(f"{name} {label}: profile failed: {type(error).__name__}: {error}", flush=True)
            q.dequantize(unet)
            del compiled
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fp16 = next((row for row in rows if row["variant"] == "unquantized"), None)
    for row in rows:
        row["vs_fp16_compiled"] = fp16["compiled_ms"] / row["compiled_ms"] if fp16 else float("nan")
        row["vs_fp16_loop"] = fp16["loop_ms"] / row["loop_ms"] if fp16 else float("nan")
    return rows


def dynamo_setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    if not hasattr(torch._dynamo.config, name):
        raise argparse.ArgumentTypeError(f"torch._dynamo.config has no {name!r}")
    return name, json.loads(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(ub.CASES), default=["sdxl", "sd15"])
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=list(q.FORMATS),
                        help="8-bit variants measured beside the unquantized call (default: int8 fp8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threshold", type=float, help="a layer's own error above which it stays fp16 (default: per format)")
    parser.add_argument("--gemms", action="store_true", help="first, the candidate layers' GEMMs alone in each precision")
    parser.add_argument("--profile", action="store_true",
                        help="after each variant's timing, print where a compiled call's time goes, by kind of kernel")
    parser.add_argument("--host-profile", action="store_true",
                        help="after each variant's timing, print where the host's time in a compiled call goes")
    parser.add_argument("--host-timeline", action="store_true",
                        help="after each variant's timing, where a call's time goes before the GPU starts (GPU only)")
    parser.add_argument("--unquantized-last", action="store_true",
                        help="measure the unquantized call after the 8-bit variants (default: first): order effects")
    parser.add_argument("--profile-calls", type=int, default=5, help="compiled calls profiled per variant (default 5)")
    parser.add_argument("--park", action="store_true",
                        help="also hold the quantized layers' full-precision weights in host memory: memory and time")
    parser.add_argument("--option", type=ub.parse_option, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--dynamo", type=dynamo_setting, action="append", default=[], metavar="NAME=JSON",
                        help="a torch._dynamo.config value for the whole run, e.g. use_recursive_dict_tags_for_guards=true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.options = CompileOptions(**dict(args.option))
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with torch._dynamo.config.patch(dict(args.dynamo)):
        rows = [row for name in args.models for row in run_case(name, args, device)]
    dynamo = "".join(f"   dynamo: {name}={value}" for name, value in args.dynamo)
    print(f"\ncard: {card}   torch: {torch.__version__}   options: {ub.describe_options(args.options)}{dynamo}")
    columns = [("model", "{}"), ("shape", "{}"), ("variant", "{}"), ("layers", "{}"), ("layer_err_median", "{:.1e}"),
               ("layer_err_max", "{:.1e}"), ("eager_ms", "{:.2f}"), ("compiled_ms", "{:.2f}"),
               ("vs_fp16_compiled", "{:.2f}x"), ("loop_ms", "{:.2f}"), ("vs_fp16_loop", "{:.2f}x"), ("host_ms", "{:.2f}"),
               ("err_vs_eager", "{:.1e}"), ("compile_s", "{:.1f}"),
               ("weights_gib", "{:.2f}"), ("weights_gib_no_masters", "{:.2f}"), ("peak_gib", "{:.2f}")]
    if args.host_timeline:
        columns += [(key, "{:.2f}") for key in TIMELINE + kp.PHASES]
    if args.park:
        columns += [("allocated_gib", "{:.2f}"), ("allocated_gib_parked", "{:.2f}"), ("parked_gib", "{:.2f}"),
                    ("park_s", "{:.2f}"), ("parked_ms", "{:.2f}"),
                    ("parked_err_vs_unparked", "{:.1e}"), ("unpark_s", "{:.2f}"), ("repark_s", "{:.2f}")]
    print(ub.markdown_table(rows, columns))
    if args.profile:
        clock = next((row["profile"]["clock"] for row in rows if row.get("profile")), "CUDA")
        print(f"\n{clock} time per call by category of kernel, ms (bench/kernel_profile.py)")
        print(kp.comparison_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
