"""What only a GPU can show of issue 13's faults; prints one table per mode.

    python bench/fault_bench.py oom        # CUDA out of memory while compiling: an eager result and the reason
    python bench/fault_bench.py oom --transient --model sd15 --factors 0.7   # the pressure passes: eager image
    python bench/fault_bench.py switches   # GPU memory over many same-architecture switches
    python bench/fault_bench.py oom --model sd15 --tiny --device cpu   # runs the code path on the CPU (no OOM there)

``oom``: for each memory cap (``torch.cuda.set_per_process_memory_fraction``: the weights, plus the eager call's peak
activations times the cap's factor), eager webui alone makes one call, then the script's wrapper from a fresh
registry makes its first three (compile and warm-up, CUDA-graph recording, replay). Attention is SDPA in both, as
webui's "sdp" optimization, installed like webui's at class level so that an eager fallback uses it too. Where eager
alone makes an image, the script must too: compiled, equal to eager within fp16 noise, or eager (error 0) with its
reason; "out of memory: lost" is the failure this bench exists to catch.

``switches``: the same architecture again and again, alternately the same model with its weights moved to the CPU and
back (new addresses, as webui's checkpoint switch does) and a new model object, each followed by compiled calls:
GPU memory allocated and reserved after each round must stay within 10% of round 1's, with no recompile. CUDA-graph
trees record a graph again for every new set of weight addresses and keep the old recordings (they hold addresses,
not tensors), checking each on every call: the ms per call column shows whether that check grows with the switches.
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import torch
import torch._dynamo

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.compile import CompileOptions  # noqa: E402
from sd_webui_onediff.compile.attention import SdpaAttention, sdpa_forward  # noqa: E402
from sd_webui_onediff.compile.engine import error_summary  # noqa: E402
from sd_webui_onediff.compile.patching import patched  # noqa: E402
from sd_webui_onediff.compile.registry import CompiledUNets  # noqa: E402
from sd_webui_onediff.bench.unet_bench import CASES, fp16_autocast, on_device, relative_error, timed_ms  # noqa: E402


def model(args, device: torch.device, seed: int = 0):
    build, full, tiny, make_inputs, latent = CASES[args.model]
    config = tiny if args.tiny else full
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build(config, seed=seed).to(device, dtype)
    inputs, kwargs = on_device(*make_inputs(config, batch=2, latent=16 if args.tiny else latent), device)
    return unet, inputs, kwargs


def webui_sdp_forward(self, x, context=None, mask=None, **_unused):
    """Stands in for webui's "sdp" cross-attention optimization: a class-level forward, so that the eager calls a
    ``CompiledUNet`` falls back to use it too, as in webui."""
    return sdpa_forward(self, x, context, mask, upcast=False)


def reserved_gib(fn, device: torch.device) -> tuple[float, float]:
    """(GiB reserved before ``fn()`` from an empty cache, the most reserved during it beyond that)."""
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_reserved(device)
    fn()
    torch.cuda.synchronize()
    return before / 2**30, (torch.cuda.max_memory_reserved(device) - before) / 2**30


def lift_cap_then(release, device: torch.device):
    """``--transient``: the pressure goes away when the compile has run out of memory (another program freed its
    memory), so the eager fallback that follows has room, as it would in such a session."""
    def lift_and_release():
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        release()
    return lift_and_release


def oom(args, device: torch.device) -> None:
    unet, inputs, kwargs = model(args, device)
    autocast = fp16_autocast(device)
    registry = CompiledUNets()
    classes = SdpaAttention(unet, upcast=False).classes
    with torch.no_grad(), patched((cls, "forward", webui_sdp_forward) for cls in classes):
        def eager():
            with autocast:
                return unet(*inputs, **kwargs)

        expected = eager()
        # The cap limits what the caching allocator reserves (its blocks are rounded up, and cuBLAS's workspace is one
        # of them), so weights and activations are measured as reserved memory too, from an empty cache.
        weights, activations = reserved_gib(eager, device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
        print(f"{args.model}: reserved for the weights {weights:.2f} GiB, for eager's activations {activations:.2f} GiB, card {total:.0f} GiB")
        print("| cap (x eager activations) | cap GiB | eager webui alone | with the script | error vs eager | reason |")
        print("|---|---|---|---|---|---|")
        for factor in args.factors:
            registry.release_memory()  # no graph or cached block of the cap before
            cap = weights + factor * activations
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            try:
                eager()
                alone = "image"
            except torch.OutOfMemoryError:
                alone = "out of memory"
            registry.release_memory()
            compiled, error, reason = None, "", ""
            try:
                compiled = registry.get(unet, CompileOptions()).compiled
                compiled.expected_class_forwards = frozenset({webui_sdp_forward.__module__})
                if args.transient and device.type == "cuda":
                    compiled.on_out_of_memory = lift_cap_then(compiled.on_out_of_memory, device)
                with autocast:
                    for _ in range(3):  # compile and warm up, record the CUDA graphs, replay them
                        out = compiled(*inputs, **kwargs)
                outcome = "compiled image" if compiled.failure is None else "eager image"
                error = f"{relative_error(out, expected):.1e}"
                reason = compiled.failure or ""
            except torch.OutOfMemoryError as raised:
                outcome = "out of memory: lost" if alone == "image" else "out of memory, as eager alone"
                reason = error_summary(raised)
            finally:
                if compiled is not None:
                    compiled.restore_eager_layout()
            print(f"| {factor} | {cap:.2f} | {alone} | {outcome} | {error} | {reason} |", flush=True)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def switches(args, device: torch.device) -> None:
    registry = CompiledUNets()
    unet, inputs, kwargs = model(args, device)
    autocast = fp16_autocast(device)
    print("| round | switch | how | graphs compiled | ms per call | allocated GiB | reserved GiB | error vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for round_ in range(1, args.rounds + 1):
            if round_ > 1 and round_ % 2:
                switch, unet = "new model object", None  # the old one freed before the next is built
                unet, inputs, kwargs = model(args, device, seed=round_)
            elif round_ > 1:
                switch = "weights to the CPU and back"
                unet.to("cpu").to(device)
            else:
                switch = "first"
            lookup = registry.get(unet, CompileOptions())
            with autocast:
                out = lookup.compiled(*inputs, **kwargs)
                milliseconds = timed_ms(lambda: lookup.compiled(*inputs, **kwargs), device, repeat=5)
                lookup.compiled.restore_eager_layout()
                expected = unet(*inputs, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            reserved = torch.cuda.memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"| {round_} | {switch} | {lookup.how} | {lookup.compiled.stats.graphs_compiled} | {milliseconds:.2f} | "
                  f"{allocated:.2f} | {reserved:.2f} | {relative_error(out, expected):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["oom", "switches"])
    parser.add_argument("--model", choices=list(CASES), default="sdxl")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the code path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.5, 1.2, 1.1, 1.0, 0.9, 0.7],
                        help="oom: memory caps as multiples of the eager call's activation peak, above the weights")
    parser.add_argument("--transient", action="store_true",
                        help="oom: lift the cap when the script's compile runs out of memory (pressure that passed)")
    parser.add_argument("--rounds", type=int, default=20, help="switches: how many switches")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # set_per_process_memory_fraction needs the index
        device = torch.device("cuda", torch.cuda.current_device())
    {"oom": oom, "switches": switches}[args.mode](args, device)


if __name__ == "__main__":
    main()
