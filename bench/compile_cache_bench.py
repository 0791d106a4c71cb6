"""Cold compile vs compile with a saved compiler cache, each in a fresh process with an empty Inductor cache directory
(as after a restart on another day), plus a model switch to a new UNet object of the same structure.

    python bench/compile_cache_bench.py                       # SDXL 1024 and SD1.5 512 on the GPU
    python bench/compile_cache_bench.py --tiny --device cpu   # tiny shapes, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import unet_bench
from sd_webui_onediff.compile import CompiledUNet, cache_artifacts  # noqa: E402


def first_call_seconds(compiled, inputs, kwargs, device) -> float:
    def call():
        with torch.no_grad(), unet_bench.fp16_autocast(device):
            return compiled(*inputs, **kwargs)

    return unet_bench.wall_seconds(call, device)[1]


def phase(args) -> dict:
    """One process: compile each model (loading the cache first when asked), then save or time a rebind."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cache_dir = Path(args.cache_dir)
    if args.load:
        cache_artifacts.load(cache_dir, args.load, device)
    result = {}
    for name in args.models:
        build, full, tiny, make_inputs, latent = unet_bench.CASES[name]
        config, latent = (tiny, 16) if args.tiny else (full, latent)
        unet = build(config, seed=1).to(device, dtype)
        inputs, kwargs = unet_bench.on_device(*make_inputs(config, batch=2, latent=latent), device)
        compiled = CompiledUNet(unet)
        result[f"{name} compile s"] = first_call_seconds(compiled, inputs, kwargs, device)
        if compiled.failure:
            raise SystemExit(compiled.failure)
        with torch.no_grad(), unet_bench.fp16_autocast(device):
            result[f"{name} ms per call"] = unet_bench.timed_ms(lambda: compiled(*inputs, **kwargs), device, repeat=10)
        if args.load:
            # a checkpoint of the same architecture arriving as a new module object: served by the same graphs
            other = build(config, seed=2).to(device, dtype)
            rebound = CompiledUNet(other, backend=compiled.backend)
            result[f"{name} rebind s"] = first_call_seconds(rebound, inputs, kwargs, device)
            result[f"{name} recompiles on rebind"] = compiled.stats.graphs_compiled - 1
            with torch.no_grad(), unet_bench.fp16_autocast(device):
                out, expected = rebound(*inputs, **kwargs), other(*inputs, **kwargs)
            result[f"{name} rebind err"] = unet_bench.relative_error(out, expected)
            del other, rebound
        del unet, compiled
    if args.save:
        cache_artifacts.save(cache_dir, args.save, device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(unet_bench.CASES), default=["sdxl", "sd15"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    work = Path(tempfile.mkdtemp(prefix="onediff-cache-bench-"))
    common = [sys.executable, __file__, "--phase", "--device", args.device, "--cache-dir", str(work / "saved"),
              "--models", *args.models] + (["--tiny"] if args.tiny else [])
    rows = {}
    for label, extra in (("cold", ["--save", "bench"]), ("with saved cache", ["--load", "bench"])):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{label.replace(' ', '-')}"))
        done = subprocess.run(common + extra, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{label} phase failed:\n{done.stderr[-4000:]}")
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\ncard: {card}   torch: {torch.__version__}   each phase: a fresh process, empty Inductor cache dir")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()) + " |")


if __name__ == "__main__":
    main()
