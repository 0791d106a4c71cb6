"""Starts a real webui for ``bench/webui_bench.py --start``: tests/webui/webui_harness.py's webui (offline, this
extension linked in, its own data dir), with the checkpoints a benchmark names built beforehand.

``tiny``: the harness's tiny checkpoints and LoRAs (``tiny-sd15-a``, ``tiny-sd15-b``, ``tiny-sdxl``, ``tiny-lora-sd15``,
``tiny-lora-sdxl``) plus a second tiny SDXL, ``tiny-sdxl-b``. ``full``: full-size checkpoints with random weights,
stored as float16, from webui's own configs (``FULL_CHECKPOINTS``, ``FULL_LORAS``), built in parallel processes while
webui starts; with ``SD_WEBUI_MODEL_CACHE`` set (bench/device_kit.py sets it) they are built there once and reused by
later runs on the same machine. On a GPU (``SD_WEBUI_GPU=1``) webui runs with ``--opt-sdp-attention``, as in README's
results, and keeps every loaded checkpoint on the GPU, so that a mixed session does not reload them from disk.
Every started webui also has the bench-only extensions ``bench/memory_probe`` (``GET /onediff-bench/memory``: what holds
GPU memory, read by the soak after every request) and ``bench/step_probe`` (``GET /onediff-bench/steps``: the host's and
the GPU's time per sampling step, read by ``speed``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parents[1] / "tests" / "webui"
MEMORY_PROBE = Path(__file__).resolve().parent / "memory_probe"  # GET /onediff-bench/memory, for the soak
STEP_PROBE = Path(__file__).resolve().parent / "step_probe"  # GET /onediff-bench/steps, for speed

SD15_CONFIG = "configs/v1-inference.yaml"
SDXL_CONFIG = "repositories/generative-models/configs/inference/sd_xl_base.yaml"
# name -> (config inside the webui, seed)
FULL_CHECKPOINTS = {"sd15-a": (SD15_CONFIG, 1), "sd15-b": (SD15_CONFIG, 2), "sdxl-a": (SDXL_CONFIG, 3),
                    "sdxl-b": (SDXL_CONFIG, 4)}
FULL_LORAS = {"lora-sd15": (SD15_CONFIG, 11), "lora-sdxl": (SDXL_CONFIG, 13)}
FULL_CONTROLNETS = {"controlnet-sd15-random", "controlnet-sdxl-random"}  # checkpoints.py --full-size builds both
LORA_RANK = 16
TINY_EXTRA = {"tiny-sdxl-b": (str(HARNESS_DIR / "configs" / "tiny-sdxl.yaml"), 4)}
LORA_BUILDER = ("import sys; sys.path.insert(0, {harness!r}); from checkpoints import build_lora; "
                "build_lora({config!r}, {out!r}, {seed}, rank={rank})")
CONTROLNET_BUILDER = ("import sys; sys.path.insert(0, {harness!r}); from checkpoints import build_controlnet_models; "
                      "build_controlnet_models({out!r}, {controlnet!r}, {webui!r}, full_size=True)")


def harness():
    """tests/webui/webui_harness.py, imported on first use: the tests import it by that bare name too."""
    if str(HARNESS_DIR) not in sys.path:
        sys.path.insert(0, str(HARNESS_DIR))
    import webui_harness

    return webui_harness


def on_gpu() -> bool:
    return os.environ.get("SD_WEBUI_GPU") == "1"


def build_commands(ui, names: set[str], full: bool, folder: Path) -> list[tuple[Path, list[str]]]:
    """(file to be made, command making it) for each named model that is not in ``folder`` yet."""
    checkpoints = FULL_CHECKPOINTS if full else TINY_EXTRA
    commands = []
    for name in sorted(names):
        if name in checkpoints:
            config, seed = checkpoints[name]
            out = folder / "Stable-diffusion" / f"{name}.safetensors"
            command = [ui.python, str(HARNESS_DIR / "checkpoints.py"), str(out.parent), "--webui", str(ui.webui_path),
                       "--config", str(ui.webui_path / config), "--name", name, "--seed", str(seed), "--half"]
        elif full and name in FULL_CONTROLNETS:
            out = folder / "ControlNet" / "controlnet-sd15-random.safetensors"
            command = [ui.python, "-c", CONTROLNET_BUILDER.format(
                harness=str(HARNESS_DIR), out=str(out.parent), controlnet=os.environ.get("SD_WEBUI_CONTROLNET"),
                webui=str(ui.webui_path))]
            if any(made == out for made, _ in commands):
                continue
        elif full and name in FULL_LORAS:
            config, seed = FULL_LORAS[name]
            out = folder / "Lora" / f"{name}.safetensors"
            command = [ui.python, "-c", LORA_BUILDER.format(harness=str(HARNESS_DIR), config=str(ui.webui_path / config),
                                                            out=str(out), seed=seed, rank=LORA_RANK)]
        else:
            continue
        if not out.with_suffix(".done").exists():  # a build cut short leaves no marker
            commands.append((out, command))
    return commands


def start_builds(ui, commands: list[tuple[Path, list[str]]]) -> list[tuple[Path, subprocess.Popen]]:
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(commands))))
    env = {**ui.env(), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running = []
    for out, command in commands:
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(out.with_suffix(".log"), "w")
        running.append((out, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)))
    return running


def wait_builds(running: list[tuple[Path, subprocess.Popen]]) -> None:
    for out, process in running:
        if process.wait() != 0:
            raise SystemExit(f"building {out.name} failed:\n{out.with_suffix('.log').read_text()[-4000:]}")
        out.with_suffix(".done").write_text("")


def link_models(folder: Path, data_dir: Path) -> None:
    for kind in ("Stable-diffusion", "Lora", "ControlNet"):
        for path in sorted((folder / kind).glob("*")):
            if path.suffix in (".safetensors", ".yaml"):
                link = data_dir / "models" / kind / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(path)


def start_webui(kind: str, names: set[str]):
    """A started harness webui with the models ``names`` lists; the caller stops it (``.stop()``)."""
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="webui-bench-"))
    full = kind == "full"
    # --no-hashing: webui would read every full-size checkpoint through once more (sha256) on its first load
    extra_args = (["--opt-sdp-attention"] if on_gpu() else []) + (["--no-hashing"] if full else [])
    ui = harness().make_webui(base, extra_args=extra_args)  # builds the tiny models
    ui.install_extension(MEMORY_PROBE, name="onediff_memory_probe")
    ui.install_extension(STEP_PROBE, name="onediff_step_probe")
    if FULL_CONTROLNETS & names:
        controlnet = os.environ.get("SD_WEBUI_CONTROLNET")  # bench/device_kit.py run --controlnet sets it
        if not controlnet:
            raise SystemExit("webui_bench: --controlnet needs SD_WEBUI_CONTROLNET (bench/device_kit.py run --controlnet)")
        ui.install_extension(Path(controlnet), name="sd-webui-controlnet")
    folder = Path(os.environ.get("SD_WEBUI_MODEL_CACHE") or base / "built") if full else ui.data_dir / "models"
    running = start_builds(ui, build_commands(ui, names, full, folder))
    print(f"webui_bench: building {len(running)} model(s) while webui starts", flush=True)
    ui.start()
    print(f"webui_bench: webui started in {ui.last_start_seconds:.1f} s", flush=True)
    wait_builds(running)
    if full:
        link_models(folder, ui.data_dir)
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
        ui.post(path).raise_for_status()
    # the tiny model loaded at start and the soak's four: none is evicted and reloaded from disk in the middle
    options = {"sd_checkpoints_limit": 5, "sd_checkpoints_keep_in_cpu": False} if on_gpu() else {}
    if options:
        ui.set_options(**options)
    print(f"webui_bench: webui and models ready after {time.perf_counter() - started:.1f} s", flush=True)
    return ui
