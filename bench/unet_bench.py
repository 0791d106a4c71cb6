"""UNet-level benchmark: eager vs compiled, same process, same card; prints one table.

    python bench/unet_bench.py                      # SDXL 1024x1024 and SD1.5 512x512 on the GPU, fp16
    python bench/unet_bench.py --tiny --device cpu  # tiny shapes on the CPU: checks that it runs and agrees (CI)

Eager is the UNet as webui runs it with its "sdp" cross-attention (PyTorch SDPA), fp16 weights under autocast; one
call is one CFG step (batch 2). Error: ||compiled - eager|| / ||eager||, and the same for eager fp16 vs eager fp32 on
the same weights, the noise level any fp16 run has; the script exits non-zero when the outputs disagree
(see ``outputs_agree``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
import statistics
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import architectures as arch  # noqa: E402
from sd_webui_onediff.bench import kernel_profile  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet, CompileOptions  # noqa: E402
from sd_webui_onediff.compile.attention import SdpaAttention  # noqa: E402

CASES = {
    # name: (builder, config, inputs, latent side at full size, tiny)
    "sdxl": (arch.sdxl_unet, arch.SDXL_FULL, arch.SDXL_TINY, arch.sdxl_inputs, 128),
    "sd15": (arch.sd_unet, arch.SD15_FULL, arch.SD15_TINY, arch.sd_inputs, 64),
}


def on_device(inputs: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Every tensor of a UNet call's arguments, nested ones (diffusers' ``added_cond_kwargs``) included, on ``device``."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device), (inputs, kwargs))


def fp16_autocast(device: torch.device) -> torch.autocast:
    """fp16 autocast on CUDA, as webui runs fp16 models; off on the CPU, where everything stays float32."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def timed_ms(fn, device: torch.device, repeat: int) -> float:
    """Median over ``repeat`` calls after three warm-ups; device events on CUDA."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            samples.append(wall_seconds(fn, device)[1] * 1e3)
    return statistics.median(samples)


def loop_ms(fn, device: torch.device, calls: int) -> float:
    """Milliseconds per call over ``calls`` calls made back to back, as a sampler makes them (nothing waits for a
    step's result), after three warm-ups: where the host's work per call is shorter than the GPU's, it overlaps the
    previous call's GPU work, and the GPU sets the pace; ``timed_ms``'s isolated call pays both."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        return wall_seconds(lambda: [fn() for _ in range(calls)], device)[1] * 1e3 / calls
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # the clock starts behind one call's GPU work, as every step of a sampler but its first
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def wall_seconds(fn, device: torch.device) -> tuple[object, float]:
    """``fn()``'s result and the wall seconds it took, its GPU work included (a compile, a first call, a whole run)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - began


def peak_gib(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = arch.output_tensor(a).float(), arch.output_tensor(b).float()
    return ((a - b).norm() / b.norm()).item()


def outputs_agree(row: dict) -> bool:
    """fp32: within 1e-4. fp16: no further from eager than twice eager fp16's own distance from fp32, plus 1e-3."""
    if row["err_eager16_vs_fp32"] == 0.0:
        return row["err_compiled_vs_eager"] < 1e-4
    return row["err_compiled_vs_eager"] <= 2 * row["err_eager16_vs_fp32"] + 1e-3


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    build, full, tiny, make_inputs, latent = CASES[name]
    config = tiny if args.tiny else full
    latent = 16 if args.tiny else latent
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build(config).to(device)
    inputs, kwargs = on_device(*make_inputs(config, batch=2, latent=latent), device)
    autocast = fp16_autocast(device)
    sdp = SdpaAttention(unet, upcast=False)

    with torch.no_grad():
        with sdp.installed():
            reference = unet(*inputs, **kwargs)  # fp32 weights
        unet.to(dtype)

        def eager():
            with autocast, sdp.installed():
                return unet(*inputs, **kwargs)

        eager_out = eager()
        eager_ms = timed_ms(eager, device, args.repeat)
        eager_peak = peak_gib(eager, device)
        allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        compiled = CompiledUNet(unet, args.options)

        def run_compiled():
            with autocast:
                return compiled(*inputs, **kwargs)

        phases_before = compile_phase_seconds()
        compiled_out, compile_s = wall_seconds(run_compiled, device)
        if compiled.failure:
            raise SystemExit(f"{name}: compile failed: {compiled.failure}")
        if args.compile_phases:
            print(f"\n{name}: where the {compile_s:.1f} s of the first call went")
            print(phase_table(phases_before, compile_phase_seconds(), run_compiled, device))
        compiled_ms = timed_ms(run_compiled, device, args.repeat)
        compiled_peak = peak_gib(run_compiled, device)
        weights_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
        row = {
            "model": name + (" tiny" if args.tiny else ""),
            "shape": f"2x4x{latent}x{latent}",
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "speedup": eager_ms / compiled_ms,
            "compiled_it_s": 1e3 / compiled_ms,
            "compile_s": compile_s,
            "weights_gib": weights_gib,
            "eager_peak_gib": eager_peak,
            "compiled_peak_gib": compiled_peak,
            "extra_resident_gib": ((torch.cuda.memory_allocated(device) - allocated_before) / 2**30) if device.type == "cuda" else float("nan"),
            "err_compiled_vs_eager": relative_error(compiled_out, eager_out),
            "err_eager16_vs_fp32": relative_error(eager_out, reference),
            "graphs": compiled.stats.graphs_compiled,
            "options": describe_options(args.options),
        }
        if args.profile:
            summary = kernel_profile.profile_calls(run_compiled, device, args.repeat, top=10)
            print("\n" + kernel_profile.profile_table(summary, f"{name}: where a compiled call's GPU time goes"))
    return row


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, format) pairs; one line per row; "-" where a row has no such key."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def compile_phase_seconds() -> dict[str, float]:
    """Seconds spent so far in each phase torch times (Dynamo tracing, AOTAutograd, Inductor lowering, code
    generation, cache lookups, Triton compiles and autotuning...)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {phase: sum(durations) for phase, durations in compilation_time_metrics.items()}


def phase_table(before: dict[str, float], after: dict[str, float], run, device: torch.device, top: int = 15) -> str:
    """The costliest phases of one compile, then the next calls, where CUDA graphs warm up and record."""
    spent = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)
    lines = ["| phase (nested: a phase includes the ones it calls) | s |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.2f} |" for seconds, phase in spent[:top] if seconds >= 0.05]
    for call in (2, 3):
        _, seconds = wall_seconds(run, device)
        lines.append(f"| call {call} after the compile (with CUDA graphs: warm-up, then recording) | {seconds:.2f} |")
    return "\n".join(lines)


def parse_option(text: str) -> tuple[str, object]:
    """``name=value`` for a field of ``CompileOptions``, the value read as the field's type."""
    name, _, value = text.partition("=")
    fields = {field.name: field for field in dataclasses.fields(CompileOptions)}
    if name not in fields or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(fields)}")
    kind = type(getattr(CompileOptions(), name))
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{name} takes true or false")
        return name, value.lower() in ("true", "1")
    return name, kind(value)


def describe_options(options: CompileOptions) -> str:
    """The options that differ from the defaults, or "defaults"."""
    changed = [f"{field.name}={getattr(options, field.name)}" for field in dataclasses.fields(options)
               if getattr(options, field.name) != field.default]
    return " ".join(changed) or "defaults"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=["sdxl", "sd15"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and 128x128 images (CPU smoke run)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="NAME=VALUE",
                        help="a CompileOptions field to change, e.g. regional=false or attention_kernel=cudnn (repeatable)")
    parser.add_argument("--profile", action="store_true", help="also print where the compiled call's GPU time goes")
    parser.add_argument("--compile-phases", action="store_true", help="also print where the compile time goes")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.options = CompileOptions(**dict(args.option))
    device = torch.device(args.device)
    if args.profile and device.type != "cuda":
        parser.error("--profile reads CUDA kernel times: run it on a GPU (--device cuda)")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for name in args.models:
        rows.append(run_case(name, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last model's memory, freed when run_case returned
    print(f"\ncard: {card}   torch: {torch.__version__}   dtype: {'fp16' if device.type == 'cuda' else 'fp32'}")
    columns = [("model", "{}"), ("shape", "{}"), ("eager_ms", "{:.2f}"), ("compiled_ms", "{:.2f}"), ("speedup", "{:.2f}x"),
               ("compiled_it_s", "{:.1f}"), ("compile_s", "{:.1f}"), ("weights_gib", "{:.2f}"), ("eager_peak_gib", "{:.2f}"),
               ("compiled_peak_gib", "{:.2f}"), ("extra_resident_gib", "{:.2f}"), ("err_compiled_vs_eager", "{:.1e}"),
               ("err_eager16_vs_fp32", "{:.1e}"), ("graphs", "{}"), ("options", "{}")]
    print(markdown_table(rows, columns))
    disagreeing = [row["model"] for row in rows if not outputs_agree(row)]
    if disagreeing:
        raise SystemExit(f"compiled and eager outputs disagree for {', '.join(disagreeing)}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
