"""Test extension of test_onediff_reliability.py: raises an exception at one stage of the script's work.

``POST /onediff-faults/inject {"stage": STAGE}`` arms one stage until ``{"stage": null}`` disarms it: errors like the
ones a broken install, a full disk or a GPU out of memory raise there. webui itself is left as it is; the faults are
raised from the extension's own functions and from torch.

``POST /onediff-faults/cycle-collector {"enabled": false}`` collects garbage, then stops Python's cycle collector (as
if it had not run since), and ``GET /onediff-faults/dropped-unets`` lists the UNets webui dropped (on the meta device)
that are still in memory, with the bytes of LoRA backups on their layers.
"""
import gc
import sys

import torch
from modules import script_callbacks

STAGES = ("bind", "compile", "first replay", "lora fuse", "cache save")
_armed = []  # (owner, name, original) of the stage armed now


def fault(stage: str):
    def raise_it(*args, **kwargs):
        raise RuntimeError(f"injected fault at {stage}")
    return raise_it


def fails_on_first_run(compile_fx):
    """Compiles for real; the compiled graph's first run raises as a CUDA-graph recording out of memory would."""
    def compile_then_fail(*args, **kwargs):
        run, runs = compile_fx(*args, **kwargs), []

        def first_run_fails(*inputs):
            runs.append(1)
            if len(runs) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected fault at first replay)")
            return run(*inputs)
        first_run_fails._boxed_call = getattr(run, "_boxed_call", False)  # called as the compiled graph would be
        return first_run_fails
    return compile_then_fail


def targets(stage: str):
    engine = sys.modules["sd_webui_onediff.compile.engine"]
    return {
        "bind": (sys.modules["sd_webui_onediff.compile.registry"].CompiledUNets, "get", fault(stage)),
        "compile": (engine, "compile_fx", fault(stage)),
        "first replay": (engine, "compile_fx", fails_on_first_run(engine.compile_fx)),
        "lora fuse": (sys.modules["sd_webui_onediff.lora"].FusedLoras, "sync", fault(stage)),
        "cache save": (torch.compiler, "save_cache_artifacts", fault(stage)),
    }[stage]


def inject(stage):
    while _armed:
        owner, name, original = _armed.pop()
        setattr(owner, name, original)
    if stage is not None:
        owner, name, replacement = targets(stage)
        _armed.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)


def on_app_started(_demo, app):
    @app.post("/onediff-faults/inject")
    def inject_route(body: dict):
        stage = body.get("stage")
        if stage is not None and stage not in STAGES:
            return {"error": f"unknown stage {stage!r}; one of {STAGES}"}
        inject(stage)
        return {"armed": stage}

    @app.post("/onediff-faults/cycle-collector")
    def cycle_collector_route(body: dict):
        if body["enabled"]:
            gc.enable()
        else:
            gc.collect()
            gc.disable()
        return {"enabled": gc.isenabled()}

    @app.get("/onediff-faults/dropped-unets")
    def dropped_unets_route():
        return [{"class": type(unet).__qualname__, "backup bytes": backup_bytes(unet)} for unet in gc.get_objects()
                if type(unet).__name__ == "UNetModel" and next(unet.parameters()).is_meta]  # type() first: proxies


def backup_bytes(unet: torch.nn.Module) -> int:
    backups = (getattr(layer, name, None) for layer in unet.modules()
               for name in ("network_weights_backup", "network_bias_backup"))
    return sum(t.numel() * t.element_size() for t in backups if isinstance(t, torch.Tensor))


script_callbacks.on_app_started(on_app_started, name="onediff faults")
