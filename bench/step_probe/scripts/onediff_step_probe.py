"""Bench-only webui extension (not part of the product): ``GET /onediff-bench/steps`` says where the sampling steps of
the generations since the last read spent their time.

Each step of webui's CFG denoiser calls ``on_cfg_denoiser`` just before the model call and ``on_cfg_denoised`` just
after it. At both, the probe notes the host's clock and, on CUDA, records an event on the current stream. Per
generation (a run of steps from step 0), medians over its steps but the first (which may compile):

- ``host step ms``: the host's time from one step's start to the next's. Where nothing waits for the GPU during
  sampling, the host runs ahead of the GPU, and this is the host's own work per step.
- ``host model ms``: the part of it in the model call (webui's and k-diffusion's wrappers and the UNet, compiled or
  not: the engine's checks, Dynamo's guards, the CUDA-graph launch).
- ``gpu step ms``: the GPU's time from one step's start to the next's: its work per step plus any time it waited for
  the host.
- ``gpu model ms``: the part of it from the model call's start to its end.

So where ``gpu step ms`` is about ``host step ms`` and more than the UNet's own work per call, the GPU waits for the
host: the host sets the pace. Where the host's step is clearly shorter, the GPU does. Nothing here synchronizes
during sampling: the events are read when asked, after the generations ended.
"""
from __future__ import annotations

import statistics
import time

_generations: list[list[dict]] = []
"""Steps of the generations since the last read, the last one possibly still running."""


def _event():
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def on_step_start(params) -> None:
    # The denoiser's own count: webui's ``state.sampling_step`` reads 0 in the first two steps.
    if getattr(params.denoiser, "step", params.sampling_step) == 0 or not _generations:
        _generations.append([])
    _generations[-1].append({"start": time.perf_counter(), "start event": _event()})


def on_model_done(params) -> None:
    if _generations and _generations[-1]:
        _generations[-1][-1].update({"done": time.perf_counter(), "done event": _event()})


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(steps: list[dict]) -> dict:
    """One generation's medians (module docstring), from its second step on; None where not measured."""
    later = [step for step in steps[1:] if "done" in step]
    periods = list(zip(steps[1:], steps[2:]))
    events = all(step["start event"] is not None for step in steps)
    return {
        "steps": len(steps),
        "host step ms": _median([(after["start"] - step["start"]) * 1e3 for step, after in periods]),
        "host model ms": _median([(step["done"] - step["start"]) * 1e3 for step in later]),
        "gpu step ms": _median([step["start event"].elapsed_time(after["start event"]) for step, after in periods])
        if events else None,
        "gpu model ms": _median([step["start event"].elapsed_time(step["done event"]) for step in later])
        if events else None,
    }


def step_probe() -> dict:
    """The generations since the last read, oldest first; reading forgets them."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the last step's events: the generations ended, this waits for nothing else
    taken, _generations[:] = list(_generations), []
    return {"generations": [summary(steps) for steps in taken if steps]}


def _add_route(_demo, app) -> None:
    app.add_api_route("/onediff-bench/steps", step_probe, methods=["GET"])


try:
    from modules import script_callbacks

    script_callbacks.on_cfg_denoiser(on_step_start)
    script_callbacks.on_cfg_denoised(on_model_done)
    script_callbacks.on_app_started(_add_route)
except ImportError:  # imported outside webui (python -c): the functions above still work
    pass
