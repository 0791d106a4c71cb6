"""Why a process's second compiled UNet spends more host time per call than its first (issue 14, stop 26's order
effect): one UNet compiled twice with the same options (two wrappers, two graphs), each measured, the first measured
again after the second, then again after each candidate remedy.

    python bench/host_order.py                        # SDXL 1024 on the GPU, fp16
    python bench/host_order.py --tiny --device cpu    # checks that it runs (no host phases without CUDA graphs)

Each row: the host's phases of one isolated call (``kernel_profile.host_phases``: engine, Dynamo's guards, wrappers
to the replay, replay), the isolated call's time, and two controls that run no torch code: a walk over the UNet's
modules' hook dicts (Python touching the model's objects, as the engine's checks do) and a loop of integer additions
(the CPU's own speed). Where the controls slow down with the phases, the process or the machine got slower, not the
compiled code; threads and child processes are counted beside them.
"""
from __future__ import annotations

import argparse
import gc
import os
import runpy
from pathlib import Path

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import kernel_profile as kp  # noqa: E402
from sd_webui_onediff.bench import unet_bench as ub  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet, CompileOptions  # noqa: E402


def children() -> int:
    """Child processes of this one (Inductor's compile workers), from /proc; -1 where there is none."""
    try:
        return sum(1 for entry in Path("/proc").iterdir() if entry.name.isdigit()
                   and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid()))
    except OSError:
        return -1


def measure(label: str, compiled: CompiledUNet, fn, modules: list, device: torch.device, repeat: int) -> dict:
    row = {"when": label}
    if device.type == "cuda":
        row.update(kp.host_phases(compiled, fn, repeat))
    row["call_ms"] = ub.timed_ms(fn, device, repeat)
    host = torch.device("cpu")  # the controls run on the host alone: its wall clock times them

    def walk():  # the Python the engine's hook checks run: the model's module objects, read one by one
        return [m._forward_hooks or m._forward_pre_hooks for m in modules]

    row["modules_walk_ms"] = ub.timed_ms(walk, host, repeat)
    row["integer_loop_ms"] = ub.timed_ms(lambda: sum(range(200_000)), host, repeat)
    row["threads"] = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1
    row["children"] = children()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    build, full, tiny, make_inputs, latent = ub.CASES["sdxl"]
    config, latent = (tiny, 16) if args.tiny else (full, latent)
    unet = build(config).to(device).to(torch.float16 if device.type == "cuda" else torch.float32)
    inputs, kwargs = ub.on_device(*make_inputs(config, batch=2, latent=latent), device)
    autocast = ub.fp16_autocast(device)
    modules = list(unet.modules())
    rows = []
    with torch.no_grad():
        wrappers = {"first": CompiledUNet(unet, CompileOptions()), "second": CompiledUNet(unet, CompileOptions())}

        def call(name: str):
            def run():
                with autocast:
                    return wrappers[name](*inputs, **kwargs)
            return run

        def row(name: str, when: str = "") -> None:
            label = f"{name}, {when}" if when else name
            rows.append(measure(label, wrappers[name], call(name), modules, device, args.repeat))

        def compile_now(name: str) -> None:
            _, seconds = ub.wall_seconds(call(name), device)
            compiled = wrappers[name]
            print(f"{name}: compiled in {seconds:.1f} s, {compiled.stats.graphs_compiled} graph(s) in its backend: "
                  f"{compiled.failure or 'ok'}", flush=True)

        compile_now("first")
        row("first")
        row("first", "again")
        compile_now("second")
        row("second", "just compiled")
        row("first", "after the second")
        gc.collect()
        gc.freeze()  # every object so far out of the collector's generations
        row("first", "after gc.freeze")
        row("second", "after gc.freeze")
        shutdown = getattr(torch._inductor.async_compile, "shutdown_compile_workers", None)
        if shutdown is not None:
            shutdown()
            row("first", "compile workers shut down")
            row("second", "compile workers shut down")
    columns = [c for c in rows[0] if c != "when"]
    print("\n| when | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['when']} | " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                                                 for c in columns) + " |")
    print(f"\n{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
