"""Quantization benchmark at UNet level: eager fp16, compiled fp16 and compiled 8-bit, same process, same card; one table.

    python bench/quant_bench.py                             # SDXL 1024 and SD1.5 512, int8 and fp8, on the GPU
    python bench/quant_bench.py --tiny --device cpu --formats int8   # CPU smoke run
    python bench/quant_bench.py --models sdxl --formats int8 fp8 --fp8-static --profile --repeat 20   # where time goes
    python bench/quant_bench.py --park              # also with full-precision weights in host memory: GPU memory, time

For each format: every candidate layer's own error is measured on the call's inputs (``measure_errors``), the layers
within the threshold are quantized, and the compiled UNet runs them in 8 bits. Error: ||out - eager fp16|| / ||eager
fp16|| over the UNet's output. Weights: GiB the UNet's weights take on the device with fp16 masters beside the 8-bit
copies, and without them (the masters of quantized layers held elsewhere).

``--profile``: after each variant's timing, ``--profile-calls`` compiled calls run under ``torch.profiler`` and one table
prints at once: CUDA time per call by category of kernel (8-bit GEMMs, fp16/bf16 GEMMs, attention, convolutions,
Inductor's Triton kernels, copies...; the rules are in ``bench/kernel_profile.py``) and the costliest kernels; at the end
one line per variant puts the categories side by side. On the CPU the profile reads operators' CPU time (a smoke run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
import statistics
from pathlib import Path

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import kernel_profile as kp  # noqa: E402
from sd_webui_onediff.bench import unet_bench as ub  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet, CompileOptions  # noqa: E402
from sd_webui_onediff.compile import host_memory  # noqa: E402
from sd_webui_onediff.compile import quantization as q  # noqa: E402
from sd_webui_onediff.compile.attention import SdpaAttention  # noqa: E402


def weights_gib(unet: torch.nn.Module, *, masters_of_quantized: bool) -> float:
    total = 0
    for module in unet.modules():
        quantized = q.is_quantized(module)
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or (quantized and name == "weight" and not masters_of_quantized):
                continue
            total += tensor.numel() * tensor.element_size()
    return total / 2**30


def allocated_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device) / 2**30


def parked(compiled: CompiledUNet, unet: torch.nn.Module, run_compiled, out, device: torch.device, repeat: int) -> dict:
    """``--park``: the quantized layers' full-precision weights held in host memory (``compile/host_memory.py``): GPU
    memory allocated before and after, ms per call then (same graph), the error against the unparked call's output,
    and the seconds of bringing them back (an eager use) and of parking them again unchanged (no copy)."""
    before = allocated_gib(device)
    compiled.park_weights = True
    try:
        run_compiled()  # parks
        after = allocated_gib(device)
        parked_out = run_compiled()
        ms = ub.timed_ms(run_compiled, device, repeat)
        layers = host_memory.parked_layers(unet)
        back_s = ub.wall_seconds(lambda: host_memory.unpark(layers), device)[1]
        again_s = ub.wall_seconds(lambda: host_memory.park(layers), device)[1]
    finally:
        compiled.park_weights = False
        host_memory.unpark(unet.modules())
    return {"allocated_gib": before, "allocated_gib_parked": after, "parked_ms": ms,
            "parked_err_vs_unparked": ub.relative_error(parked_out, out), "unpark_s": back_s, "repark_s": again_s}


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
        # (label, format, Inductor config patches, static fp8 input scales)
        variants = [("unquantized", None, {}, False)] + [(f, f, {}, False) for f in args.formats]
        if "int8" in args.formats and args.int8_fused_mul:
            variants.append(("int8 fused-mul", "int8", {"force_fuse_int_mm_with_mul": True}, False))
        if "fp8" in args.formats and args.fp8_static:
            variants.append(("fp8 static", "fp8", {}, True))
        for label, format, inductor, static in variants:
            chosen, errors, amax = (), {}, {}
            if format is not None:
                reason = q.unsupported_reason(format, device)
                if reason:
                    print(f"{name} {label}: {reason}")
                    continue
                errors = q.measure_errors(candidates, format, eager, amax)
                chosen = q.choose_layers(errors, args.threshold or q.DEFAULT_THRESHOLDS[format])
                q.apply(unet, q.Quantization(format, chosen, tuple(amax[n] for n in chosen) if static else None))
            compiled = CompiledUNet(unet, args.options)

            def run_compiled():
                with autocast:
                    return compiled(*inputs, **kwargs)

            with torch._inductor.config.patch(inductor):
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
            if args.park and format is not None:
                rows[-1].update(parked(compiled, unet, run_compiled, out, device, args.repeat))
            print(json.dumps(rows[-1]), flush=True)  # a run cut short by a timeout still leaves its rows
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
    fp16_ms = next((row["compiled_ms"] for row in rows if row["variant"] == "unquantized"), float("nan"))
    for row in rows:
        row["vs_fp16_compiled"] = fp16_ms / row["compiled_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(ub.CASES), default=["sdxl", "sd15"])
    parser.add_argument("--formats", nargs="+", choices=q.FORMATS, default=list(q.FORMATS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threshold", type=float, help="a layer's own error above which it stays fp16 (default: per format)")
    parser.add_argument("--int8-fused-mul", action="store_true", help="also int8 with Inductor's force_fuse_int_mm_with_mul")
    parser.add_argument("--fp8-static", action="store_true", help="also fp8 with static per-tensor input scales")
    parser.add_argument("--profile", action="store_true",
                        help="after each variant's timing, print where a compiled call's time goes, by kind of kernel")
    parser.add_argument("--profile-calls", type=int, default=5, help="compiled calls profiled per variant (default 5)")
    parser.add_argument("--park", action="store_true",
                        help="also hold the quantized layers' full-precision weights in host memory: memory and time")
    parser.add_argument("--option", type=ub.parse_option, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.options = CompileOptions(**dict(args.option))
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [row for name in args.models for row in run_case(name, args, device)]
    print(f"\ncard: {card}   torch: {torch.__version__}   options: {ub.describe_options(args.options)}")
    columns = [("model", "{}"), ("shape", "{}"), ("variant", "{}"), ("layers", "{}"), ("layer_err_median", "{:.1e}"),
               ("layer_err_max", "{:.1e}"), ("eager_ms", "{:.2f}"), ("compiled_ms", "{:.2f}"),
               ("vs_fp16_compiled", "{:.2f}x"), ("err_vs_eager", "{:.1e}"), ("compile_s", "{:.1f}"),
               ("weights_gib", "{:.2f}"), ("weights_gib_no_masters", "{:.2f}"), ("peak_gib", "{:.2f}")]
    if args.park:
        columns += [("allocated_gib", "{:.2f}"), ("allocated_gib_parked", "{:.2f}"), ("parked_ms", "{:.2f}"),
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
