"""Where a compiled call's time goes, by kind of kernel: ``bench/quant_bench.py --profile``.

``kernel_category`` sorts a kernel by its name alone (a pure function, tested in ``tests/test_kernel_profile.py``);
``profile_calls`` profiles a few calls with ``torch.profiler`` and ``summarize`` / ``profile_table`` turn the kernels'
times into one compact table: time per call, share and kernels per call for each category, then the costliest kernels.

The rules, on the lower-cased name, first match wins:

1. Inductor's Triton kernels (names start with ``triton_``): templates (``triton_tem_``) whose name holds ``_int_mm`` or
   ``_scaled_mm`` are 8-bit GEMMs, other templates named after ``mm``/``addmm``/``bmm`` are GEMMs of another precision,
   ``conv`` templates convolutions; every other ``triton_`` kernel (``triton_poi_``, ``triton_red_``, ``triton_per_``:
   fused pointwise, reductions, norms, the 8-bit graphs' quantize and rescale kernels) is "Triton".
2. Copies and fills: ``memcpy``, ``memset``, ``copy`` (``direct_copy_kernel``, ``CatArrayBatchedCopy``, ``aten::copy_``),
   ``fill`` (``FillFunctor``).
3. Attention: ``flash``, ``fmha``, ``attention``, ``sdpa``, ``attn``, ``mem_eff`` (cuDNN's
   ``cudnn_generated_fort_native_sdpa...``, ``pytorch_flash::flash_fwd_kernel``, ``fmha_cutlassF...``).
4. Convolutions: ``conv``, ``implicit``, ``winograd``, ``fprop``, ``dgrad``, ``wgrad``, cuDNN's layout transforms
   (``nchwToNhwc``, ``nhwcToNchw``) and any other ``cudnn`` kernel (cuDNN's convolutions are implicit GEMMs: checked
   before GEMMs).
5. GEMMs: ``gemm``, ``gemv``, ``xmma``, ``cutlass``, ``nvjet``, ``cublas``, ``matmul``, ``hmma``, ``imma``, ``gmma``,
   two 8-bit operand types (``f8f8``, ``i8i8``), and on the CPU ``aten::mm``/``addmm``/``bmm``/``_int_mm``/``_scaled_mm``/``linear``. Their precision, generously:

   - 8-bit: ``int8``, ``e4m3``, ``e5m2``, ``fp8``, ``float8``, ``imma``, ``qgmma``, ``_int_mm``, ``_scaled_mm``, or a
     token ``i8``/``s8``/``u8``/``f8`` not preceded by a letter (``sm80_xmma_gemm_i8i8_i8i32...``, ``f8f8bf16_rowwise``);
     cuBLASLt's ``nvjet_[sm90_]<types>_...`` kernels by the first letter of their type code, the input type: ``h``
     (fp16, ``hsh``), ``t``/``b`` (bf16, ``tst``) are 16-bit, ``s``/``d`` (fp32/fp64) another precision, any other
     letter (``q``: e4m3, ``qqtst``) 8-bit;
   - fp16/bf16: ``f16``, ``fp16``, ``bf16``, ``half``, ``bfloat16``, ``hgemm``, ``hmma``;
   - anything else: "GEMM, other precision" (fp32, tf32, or a name that does not say).
6. Everything else: "other".

On the GPU the times are the kernels' CUDA times; on the CPU (a smoke run of the code path) the profiled operators'
self CPU times, which say little about a GPU.
"""
from __future__ import annotations

import re

GEMM_8BIT = "8-bit GEMM"
GEMM_16BIT = "fp16/bf16 GEMM"
GEMM_OTHER = "GEMM, other precision"
ATTENTION = "attention"
CONVOLUTION = "convolution"
TRITON = "Triton (Inductor)"
COPY = "copy/memset"
OTHER = "other"
CATEGORIES = (GEMM_8BIT, GEMM_16BIT, GEMM_OTHER, ATTENTION, CONVOLUTION, TRITON, COPY, OTHER)

_COPY = re.compile(r"memcpy|memset|copy|fill")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|attn|mem_eff")
_CONVOLUTION = re.compile(r"conv|implicit|winograd|fprop|dgrad|wgrad|nchwtonhwc|nhwctonchw|cudnn")
_GEMM = re.compile(r"gemm|gemv|xmma|cutlass|nvjet|cublas|matmul|hmma|imma|gmma|f8f8|i8i8"
                   r"|aten::(?:mm|addmm|bmm|baddbmm|_int_mm|_scaled_mm|linear)\b")
_8BIT = re.compile(r"int8|e4m3|e5m2|fp8|float8|imma|qgmma|_int_mm|_scaled_mm|(?<![a-z])[isuf]8")
_16BIT = re.compile(r"f16|fp16|bf16|half|bfloat16|hgemm|hmma")
_NVJET = re.compile(r"nvjet_(?:sm\d+_)?([a-z]+)_")


def kernel_category(name: str) -> str:
    """One of ``CATEGORIES`` for a kernel (or, on the CPU, operator) name; the rules are in the module's docstring."""
    name = name.lower()
    if name.startswith("triton_"):
        if name.startswith("triton_tem_"):
            if "_int_mm" in name or "_scaled_mm" in name:
                return GEMM_8BIT
            if "conv" in name:
                return CONVOLUTION
            if re.search(r"attention|flex", name):
                return ATTENTION
            if re.search(r"mm(?![a-z])", name):
                return GEMM_OTHER
        return TRITON
    if _COPY.search(name):
        return COPY
    if _ATTENTION.search(name):
        return ATTENTION
    if _CONVOLUTION.search(name):
        return CONVOLUTION
    if _GEMM.search(name):
        nvjet = _NVJET.search(name)
        if nvjet:
            first = nvjet.group(1)[0]
            return GEMM_16BIT if first in "htb" else GEMM_OTHER if first in "sd" else GEMM_8BIT
        if _8BIT.search(name):
            return GEMM_8BIT
        if _16BIT.search(name):
            return GEMM_16BIT
        return GEMM_OTHER
    return OTHER


def summarize(kernels: list[tuple[str, float, int]], calls: int, clock: str = "CUDA", top: int = 8) -> dict:
    """``kernels``: (name, total microseconds, launches) over ``calls`` calls. Per call: ms, share and launches of each
    category (every category, in ``CATEGORIES`` order, so that variants line up), and the ``top`` costliest kernels."""
    total_us = sum(us for _, us, _ in kernels)
    share = (lambda us: us / total_us) if total_us else (lambda us: 0.0)
    by_category = {category: [0.0, 0] for category in CATEGORIES}
    for name, us, count in kernels:
        entry = by_category[kernel_category(name)]
        entry[0] += us
        entry[1] += count
    costliest = sorted(kernels, key=lambda kernel: -kernel[1])[:top]
    return {
        "clock": clock, "calls": calls, "ms_per_call": total_us / calls / 1e3,
        "kernels_per_call": sum(count for _, _, count in kernels) / calls,
        "categories": [{"category": category, "ms_per_call": us / calls / 1e3, "share": share(us),
                        "kernels_per_call": count / calls} for category, (us, count) in by_category.items()],
        "top": [{"kernel": name, "category": kernel_category(name), "ms_per_call": us / calls / 1e3, "share": share(us),
                 "per_call": count / calls} for name, us, count in costliest],
    }


def profile_calls(fn, device, calls: int, top: int = 8) -> dict:
    """``summarize`` over ``calls`` calls of ``fn`` after one more warm call: CUDA kernels on a GPU, the operators' self
    CPU time on the CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [(event.key, event.device_time_total if cuda else event.self_cpu_time_total, event.count)
               for event in prof.key_averages() if event.device_type == kind]
    return summarize(kernels, calls, "CUDA" if cuda else "CPU self", top)


def host_timeline(fn, calls: int = 5) -> dict:
    """Where one call's time goes on a GPU before the GPU works, the GPU idle at the call's start; ms from the call's
    start, medians of ``calls`` profiled calls: until the first CUDA-graph launch begins (``to_launch_ms``: Python,
    Dynamo's guards, the engine's checks), in the launches (``launch_ms``: the driver submitting the graph's kernels),
    until the GPU's first kernel starts (``to_gpu_ms``), and until the call returns (``returns_ms``)."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("onediff_timed_call"):
                fn()
            torch.cuda.synchronize()
        events = prof.events()
        call = next(event for event in events if event.name == "onediff_timed_call")
        launches = [event for event in events if event.name.startswith("cudaGraphLaunch")]  # some CUDAs add "_v10000"
        kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
        start = call.time_range.start
        samples.append({
            "to_launch_ms": (min(e.time_range.start for e in launches) - start) / 1e3 if launches else float("nan"),
            "launch_ms": sum(e.time_range.elapsed_us() for e in launches) / 1e3,
            "to_gpu_ms": (min(e.time_range.start for e in kernels) - start) / 1e3 if kernels else float("nan"),
            "returns_ms": call.time_range.elapsed_us() / 1e3,
        })
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


PHASES = ("engine_ms", "guards_ms", "to_replay_ms", "replay_ms", "after_ms")
"""``host_phases``' columns."""


def host_phases(compiled, fn, calls: int = 20) -> dict:
    """Where the host's time in one call of ``compiled`` (a ``CompiledUNet`` that ``fn()`` calls) goes, timed with
    ``time.perf_counter`` alone (a profiler's own overhead would swamp these phases); ms, medians of ``calls`` calls,
    the GPU idle at each start: the engine's work before the compiled module (``engine_ms``: its checks and patches),
    Dynamo until its guards passed (``guards_ms``; nan where torch has no guard hook), from there to the first CUDA
    graph replay (``to_replay_ms``: AOTAutograd's and the CUDA-graph tree's wrappers), the replays (``replay_ms``: the
    driver launching the graph) and the rest until ``fn`` returns (``after_ms``)."""
    import math
    import statistics
    import time

    import torch

    from sd_webui_onediff.compile.patching import patched

    marks: dict[str, float] = {}
    inner, replay = compiled._compiled, torch.cuda.CUDAGraph.replay

    def entering(*args, **kwargs):
        marks.setdefault("enter", time.perf_counter())
        return inner(*args, **kwargs)

    def replaying(graph):
        marks.setdefault("replay", time.perf_counter())
        replay(graph)
        marks["replayed"] = time.perf_counter()

    hook = getattr(torch._C._dynamo.eval_frame, "set_guard_complete_hook", None)
    # Set as the engine sets it: nn.Module's setattr, putting the compiled module back, would make it a submodule.
    object.__setattr__(compiled, "_compiled", entering)
    previous_hook = hook(lambda hit: marks.setdefault("guards", time.perf_counter())) if hook else None
    samples = []
    try:
        with patched([(torch.cuda.CUDAGraph, "replay", replaying)]):
            for _ in range(calls):
                torch.cuda.synchronize()
                marks.clear()
                start = time.perf_counter()
                fn()
                end = time.perf_counter()
                guards = marks.get("guards", float("nan"))
                samples.append({
                    "engine_ms": marks["enter"] - start, "guards_ms": guards - marks["enter"],
                    "to_replay_ms": marks["replay"] - (marks["enter"] if math.isnan(guards) else guards),
                    "replay_ms": marks["replayed"] - marks["replay"], "after_ms": end - marks["replayed"],
                })
    finally:
        if hook:
            hook(previous_hook)
        object.__setattr__(compiled, "_compiled", inner)
    return {key: statistics.median(sample[key] for sample in samples) * 1e3 for key in PHASES}


def profile_table(summary: dict, title: str) -> str:
    """The categories (those with any kernel) and the costliest kernels, as two small markdown tables."""
    launches = "kernels" if summary["clock"] == "CUDA" else "operators"
    lines = [f"{title}: {summary['ms_per_call']:.2f} ms of {summary['clock']} time and "
             f"{summary['kernels_per_call']:.0f} {launches} per call ({summary['calls']} calls profiled)",
             "", f"| category | ms per call | share | {launches} per call |", "|---|---|---|---|"]
    lines += [f"| {row['category']} | {row['ms_per_call']:.3f} | {row['share']:.0%} | {row['kernels_per_call']:.0f} |"
              for row in summary["categories"] if row["kernels_per_call"]]
    lines += ["", "| costliest kernels | category | ms per call | share | per call |", "|---|---|---|---|---|"]
    lines += [f"| {row['kernel'][:100]} | {row['category']} | {row['ms_per_call']:.3f} | {row['share']:.0%} | "
              f"{row['per_call']:.0f} |" for row in summary["top"]]
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    """One line per profiled variant: its call time and the ms per call of each category, side by side."""
    profiled = [row for row in rows if row.get("profile")]
    lines = ["| model | variant | compiled_ms | profiled ms | " + " | ".join(CATEGORIES) + " |",
             "|" + "---|" * (4 + len(CATEGORIES))]
    for row in profiled:
        ms = {entry["category"]: entry["ms_per_call"] for entry in row["profile"]["categories"]}
        lines.append(f"| {row['model']} | {row['variant']} | {row['compiled_ms']:.2f} | {row['profile']['ms_per_call']:.2f} | "
                     + " | ".join(f"{ms[category]:.2f}" for category in CATEGORIES) + " |")
    return "\n".join(lines)
