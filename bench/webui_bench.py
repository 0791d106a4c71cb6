"""End-to-end numbers from a running webui: eager webui against the OneDiff script, through webui's HTTP API.

Start webui with ``--api`` and this extension installed, with the checkpoints named below in its models folder, then::

    python bench/webui_bench.py --url http://127.0.0.1:7860 speed --checkpoint sd15-a --size 512 --save-cache sd15
    python bench/webui_bench.py --url ... switch --checkpoint sd15-a --to sd15-b
    python bench/webui_bench.py --url ... lora --checkpoint sdxl --size 1024 --lora NAME
    python bench/webui_bench.py --url ... session --requests session.json
    python bench/webui_bench.py --url ... first-image --checkpoint sd15-a --size 512 --cache NAME

Each prints a markdown table and appends its rows to ``--json``. Only the standard library and ``requests`` are needed.

- ``speed``: 30 steps of Euler a, batch 1, seconds from request to image (median of ``--repeat``), eager then with the
  script; it/s from the difference of a 30-step and a 10-step request (text encoding, VAE decode and the HTTP round trip
  cancel out). The script's first request (compile, or the cache given with ``--cache``) is timed apart. Peak GPU
  memory as webui's ``/sdapi/v1/memory`` reports it (torch's allocator, since webui started): eager runs first, so the
  peak after the script's runs is the higher of the two. Last, one image each way, same seed, compared pixel by pixel
  and by SSIM (``image_quality.py``). In a webui started with ``--start``, each way also a step's time, the host's and
  the GPU's, and their parts in the model call (``bench/step_probe``: which of the two sets the pace). ``--quantize``:
  the script's requests with "Model Quantization(int8) Speed Up" (the format webui's setting names), in every
  benchmark; ``speed`` then also measures the script's unquantized it/s and steps in the same webui, last (first with
  ``--unquantized-first``). Where the probe's times are there, the ratio column also compares the GPU's steps: it/s
  from the difference of two requests' times carries both requests' variation, the probe's medians cover every step.
- ``switch``: seconds webui takes to load another checkpoint (``sd_model_checkpoint``), eager webui against the script,
  where the switch also includes the first image after it (rebinding the compiled graph, 0 compiles expected). Both
  checkpoints are loaded once before, so webui's hashing of a checkpoint's first load counts in neither.
- ``lora``: the ``OneDiff LoRA fuse`` time of each LoRA change and it/s with and without the LoRA.
- ``session``: a list of requests (``[{"checkpoint": ..., "payload": {...}}, ...]``) run with the script; counts what
  each did (``OneDiff: compiled / reused / loaded``) from the infotext.
- ``first-image``: seconds of the first request after a webui start, with the script and a saved compiler cache.
- ``soak``: ``--count`` mixed requests (two SD1.5 and two SDXL checkpoints, three sizes, hires fix, refiner, LoRA on
  and off) in one webui; failed requests, eager fallbacks, images against eager webui's, compiles against new shapes,
  GPU memory round by round (``bench/webui_soak.py`` says what it checks); with ``--start``, what holds the memory
  after every request (the bench's memory probe); ``--eager``: the same requests without the script, for webui's own
  memory curve.
- ``speed --controlnet NAME``: every request with one sd-webui-controlnet unit of that model (preprocessor ``none``,
  a generated hint image), then 5 varied ControlNet requests with the script (weight, start/end, hint, control mode),
  whose infotexts count the recompiles (0 expected). Build random full-size ControlNets with
  ``tests/webui/checkpoints.py OUT --controlnet-dir <webui>/models/ControlNet --full-size``.

``--start tiny|full`` starts a webui itself instead of ``--url`` (``bench/webui_start.py``: the test harness's webui
with tiny or full-size random checkpoints; on a GPU machine without network, inside ``bench/device_kit.py run``).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import requests

SCRIPT_TITLE = "onediff_diffusion_model"
BASE = {"prompt": "a photo of a cat, highly detailed", "negative_prompt": "blurry", "sampler_name": "Euler a",
        "cfg_scale": 7.0, "seed": 1234, "batch_size": 1, "n_iter": 1, "save_images": False,
        "send_images": False, "do_not_save_samples": True, "do_not_save_grid": True}


class WebUI:
    def __init__(self, url: str, script_args: list | None = None):
        self.url = url.rstrip("/")
        self.script_args = script_args or []
        """The script's arguments where a request names none (``[True]`` with ``--quantize``)."""

    def post(self, path: str, body: dict, timeout: float = 1800) -> dict:
        response = requests.post(self.url + path, json=body, timeout=timeout)
        if response.status_code != 200:
            raise SystemExit(f"{path} failed: HTTP {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else {}

    def select(self, checkpoint: str) -> float:
        """Loads ``checkpoint`` (a title or name webui lists); the seconds it took, 0 if it was loaded already."""
        current = requests.get(self.url + "/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
        if current.split(" [")[0].rsplit(".", 1)[0] == checkpoint:
            return 0.0
        started = time.perf_counter()
        self.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint})
        return time.perf_counter() - started

    def txt2img(self, script: bool, script_args: list | None = None, **payload) -> tuple[float, str]:
        """(seconds, infotext) of one request."""
        seconds, answer = self.timed_txt2img(script, script_args, **payload)
        return seconds, json.loads(answer["info"])["infotexts"][0]

    def timed_txt2img(self, script: bool, script_args: list | None = None, **payload) -> tuple[float, dict]:
        body = {**BASE, **payload}
        if script:
            body.update(script_name=SCRIPT_TITLE, script_args=self.script_args if script_args is None else script_args)
        started = time.perf_counter()
        answer = self.post("/sdapi/v1/txt2img", body)
        return time.perf_counter() - started, answer

    def image(self, script: bool, **payload):
        """The first image of a request as a uint8 array (numpy and PIL needed here only)."""
        import base64
        import io

        import numpy
        from PIL import Image

        _, answer = self.timed_txt2img(script, send_images=True, **payload)
        return numpy.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))

    def memory_gib(self) -> dict:
        cuda = requests.get(self.url + "/sdapi/v1/memory", timeout=60).json().get("cuda", {})
        if "allocated" not in cuda:
            return {}
        gib = 1024 ** 3
        return {"allocated": cuda["allocated"]["current"] / gib, "allocated peak": cuda["allocated"]["peak"] / gib,
                "reserved": cuda["reserved"]["current"] / gib,
                "device used": cuda["system"]["used"] / gib}


def infotext_field(infotext: str, key: str = "OneDiff") -> str | None:
    """The value of ``key`` in an infotext's parameter line, its last (webui quotes values holding ',' or ':'), or
    None. The webui tests read the infotext with it too."""
    match = re.search(rf'(?:^|, ){re.escape(key)}: ("(?:[^"\\]|\\.)*"|[^,\n]*)', infotext.splitlines()[-1])
    if match is None:
        return None
    value = match.group(1)
    return json.loads(value) if value.startswith('"') else value


def require_script_ran(infotext: str) -> str:
    outcome = infotext_field(infotext) or "not in infotext"
    if outcome.startswith(("eager", "not used", "not in")):
        raise SystemExit(f"the script did not run compiled: OneDiff: {outcome}\n{infotext}")
    return outcome


def median_seconds(ui: WebUI, repeat: int, script: bool, **payload) -> float:
    times = []
    for _ in range(repeat):
        seconds, infotext = ui.txt2img(script, **payload)
        if script:
            require_script_ran(infotext)
        times.append(seconds)
    return statistics.median(times)


def steps_per_second(ui: WebUI, repeat: int, script: bool, steps: int, **payload) -> tuple[float, float, dict | None]:
    """(median seconds of ``steps`` steps, it/s from the difference with a third as many steps, the step probe's times
    of those ``steps``-step requests: ``step_times``)."""
    few = max(1, steps // 3)
    step_times(ui, steps)  # forgets the generations before these
    full = median_seconds(ui, repeat, script, steps=steps, **payload)
    short = median_seconds(ui, repeat, script, steps=few, **payload)
    return full, (steps - few) / max(full - short, 1e-9), step_times(ui, steps)


STEP_FIELDS = ("host step ms", "host model ms", "gpu step ms", "gpu model ms")
"""``GET /onediff-bench/steps``' medians per generation (``bench/step_probe``)."""


def step_times(ui: WebUI, steps: int) -> dict | None:
    """The medians over the generations of ``steps`` steps since the last read of webui's step probe, field by field
    (``STEP_FIELDS``; None where not measured), or None where webui has no probe (a webui not started by
    webui_start). Reading forgets them (``steps_per_second`` reads once before its requests, to start clean)."""
    response = requests.get(ui.url + "/onediff-bench/steps", timeout=60)
    if response.status_code == 404:
        return None
    generations = [entry for entry in response.json()["generations"] if entry["steps"] == steps]
    return {field: statistics.median(values) if (values := [g[field] for g in generations if g[field] is not None])
            else None for field in STEP_FIELDS}


def step_cells(times: dict | None) -> str:
    """``host / in the model call`` and the GPU's, in ms, for one table cell."""
    def pair(step, model):
        return "n/a" if times[step] is None else f"{times[step]:.1f} ({times[model]:.1f})"

    if times is None:
        return "no probe"
    return f"host {pair('host step ms', 'host model ms')}, GPU {pair('gpu step ms', 'gpu model ms')}"


def image_size(args) -> dict:
    return {"width": args.width or args.size, "height": args.size}


def hint_image(width: int, height: int, turned: bool = False) -> str:
    """A base64 PNG with gradients and a disc (numpy and PIL needed here only)."""
    import base64
    import io

    import numpy
    from PIL import Image

    y, x = numpy.mgrid[0:height, 0:width] / max(width, height) * 255
    disc = ((x - 160) ** 2 + (y - 100) ** 2 < 60 ** 2) * 120
    pixels = numpy.stack([x, y, 255 - x / 2 - disc], axis=-1).clip(0, 255).astype(numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, ::-1] if turned else pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def controlnet_unit(args, weight: float = 1.0, start: float = 0.0, end: float = 1.0, turned: bool = False,
                    mode: str = "Balanced") -> dict:
    """``alwayson_scripts`` with one ControlNet unit of ``--controlnet`` (preprocessor none, the hint given)."""
    size = image_size(args)
    unit = {"enabled": True, "module": "none", "model": args.controlnet, "weight": weight,
            "image": hint_image(size["width"], size["height"], turned), "resize_mode": "Crop and Resize",
            "guidance_start": start, "guidance_end": end, "pixel_perfect": False, "control_mode": mode,
            "save_detected_map": False}
    return {"alwayson_scripts": {"controlnet": {"args": [unit]}}}


CONTROLNET_VARIATIONS = {"weight 0.5": {"weight": 0.5}, "start/end 0.2-0.7": {"start": 0.2, "end": 0.7},
                         "another hint": {"turned": True}, "soft injection": {"mode": "My prompt is more important"},
                         "cfg injection": {"mode": "ControlNet is more important"}}


def controlnet_recompiles(ui: WebUI, args) -> dict:
    outcomes = {}
    for what, settings in CONTROLNET_VARIATIONS.items():
        _, infotext = ui.txt2img(True, steps=args.steps, **image_size(args), **controlnet_unit(args, **settings))
        outcomes[what] = require_script_ran(infotext)
    recompiles = sum(not outcome.startswith("reused") for outcome in outcomes.values())
    print(f"| {len(outcomes)} varied ControlNet requests ({', '.join(outcomes)}): recompiles | | {recompiles} | |")
    return {"bench": "speed controlnet variations", "controlnet": args.controlnet, "outcomes": outcomes,
            "recompiles": recompiles}


def unquantized_steps_per_second(ui: WebUI, args, size: dict) -> tuple[float, dict | None]:
    """The script's it/s and step times with the quantization box unchecked (``steps_per_second``), its graph compiled
    by a request before."""
    ui.txt2img(True, [False], steps=args.steps, **size)
    quantized_args, ui.script_args = ui.script_args, [False]
    try:
        _, its, steps = steps_per_second(ui, args.repeat, True, args.steps, **size)
    finally:
        ui.script_args = quantized_args
    return its, steps


def step_ratio(baseline: dict | None, measured: dict | None) -> str:
    """How many times shorter the GPU's step is in ``measured`` than in ``baseline`` ("" without the probe's times)."""
    if not baseline or not measured or not baseline["gpu step ms"] or not measured["gpu step ms"]:
        return ""
    return f"{baseline['gpu step ms'] / measured['gpu step ms']:.2f}x"


def speed(ui: WebUI, args) -> list[dict]:
    ui.select(args.checkpoint)
    size = {**image_size(args), **(controlnet_unit(args) if args.controlnet else {})}
    ui.txt2img(False, steps=4, **size)  # warm-up: cuDNN/cuBLAS choices, allocator
    eager_s, eager_its, eager_steps = steps_per_second(ui, args.repeat, False, args.steps, **size)
    eager_memory = ui.memory_gib()
    unquantized_its = unquantized_steps = None
    if args.quantize and args.unquantized_first:
        unquantized_its, unquantized_steps = unquantized_steps_per_second(ui, args, size)
    first_s, first_info = ui.txt2img(True, [bool(args.quantize), args.cache or "None", args.save_cache], steps=args.steps, **size)
    outcome = require_script_ran(first_info)
    script_s, script_its, script_steps = steps_per_second(ui, args.repeat, True, args.steps, **size)
    script_memory = ui.memory_gib()
    eager_image, script_image = (ui.image(script, steps=args.steps, **size) for script in (False, True))
    difference = abs(eager_image.astype(int) - script_image.astype(int))
    if args.quantize and not args.unquantized_first:  # last: its graphs and memory must not count in the rows above
        unquantized_its, unquantized_steps = unquantized_steps_per_second(ui, args, size)
    from image_quality import ssim  # numpy, like ui.image
    row = {"bench": "speed", "checkpoint": args.checkpoint, "controlnet": args.controlnet,
           "size": f"{size['width']}x{size['height']}",
           "steps": args.steps, "eager s": eager_s, "eager it/s": eager_its, "script s": script_s,
           "script it/s": script_its, "first script request s": first_s, "first request": outcome,
           "eager memory GiB": eager_memory, "memory after script GiB": script_memory,
           "image difference mean": float(difference.mean()), "image difference max": int(difference.max()),
           "image SSIM": ssim(script_image, eager_image), "quantize": args.quantize,
           "script unquantized it/s": unquantized_its, "eager step": eager_steps, "script step": script_steps,
           "script unquantized step": unquantized_steps}
    with_unit = (f" + ControlNet {args.controlnet}" if args.controlnet else "") + (f", quantized ({args.quantize})" if args.quantize else "")
    print(f"\n| {args.checkpoint}{with_unit} {row['size']}, {args.steps} steps Euler a, batch 1 | eager | script | ratio |")
    print("|---|---|---|---|")
    print(f"| end to end, s | {eager_s:.2f} | {script_s:.2f} | {eager_s / script_s:.2f}x |")
    print(f"| it/s | {eager_its:.2f} | {script_its:.2f} | {script_its / eager_its:.2f}x |")
    if unquantized_its is not None:
        print(f"| it/s, the script unquantized (same webui) | | {unquantized_its:.2f} | "
              f"quantized {script_its / unquantized_its:.2f}x |")
    print(f"| a step, ms: host's time (in the model call), GPU's time (in the model call) | {step_cells(eager_steps)} | "
          f"{step_cells(script_steps)} | {step_ratio(eager_steps, script_steps)} |")
    if args.quantize:
        ratio = step_ratio(unquantized_steps, script_steps)
        print(f"| a step, ms, the script unquantized | | {step_cells(unquantized_steps)} | "
              f"{'quantized ' + ratio if ratio else ''} |")
    print(f"| first script request: {outcome} | | {first_s:.1f} s | |")
    for key in eager_memory:
        print(f"| {key}, GiB | {eager_memory[key]:.2f} | {script_memory[key]:.2f} (max of both) | |")
    print(f"| image vs eager's, same seed: mean / max abs difference of uint8 pixels | | "
          f"{row['image difference mean']:.2f} / {row['image difference max']} | |")
    print(f"| image vs eager's, SSIM | | {row['image SSIM']:.4f} | |")
    return [row, controlnet_recompiles(ui, args)] if args.controlnet else [row]


def switch(ui: WebUI, args) -> list[dict]:
    size = image_size(args)
    ui.select(args.to)  # webui hashes a checkpoint on its first load: keep that out of both measurements
    rows = []
    for script in (False, True):
        ui.select(args.checkpoint)
        ui.txt2img(script, steps=4, **size)  # compiled and bound to the first checkpoint
        steady, _ = ui.txt2img(script, steps=4, **size)
        load = ui.select(args.to)
        first, infotext = ui.txt2img(script, steps=4, **size)
        outcome = require_script_ran(infotext) if script else "eager"
        rows.append({"bench": "switch", "from": args.checkpoint, "to": args.to, "script": script, "load s": load,
                     "first request after s": first, "steady request s": steady,
                     "switch cost s": load + first - steady, "first request": outcome})
    ui.select(args.checkpoint)
    print(f"\n| switch {args.checkpoint} -> {args.to} | checkpoint load s | first 4-step image after s "
          "| usual 4-step image s | switch cost s | graph |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {'script' if row['script'] else 'eager webui'} | {row['load s']:.2f} | "
              f"{row['first request after s']:.2f} | {row['steady request s']:.2f} | {row['switch cost s']:.2f} "
              f"| {row['first request']} |")
    return rows


def lora(ui: WebUI, args) -> list[dict]:
    ui.select(args.checkpoint)
    size = image_size(args)
    ui.txt2img(True, steps=4, **size)
    rows = []
    plan = [("no LoRA", ""), (f"{args.lora} at 1.0", f" <lora:{args.lora}:1>"),
            (f"{args.lora} at 0.5", f" <lora:{args.lora}:0.5>"), ("removed", "")]
    for label, tags in plan:
        _, infotext = ui.txt2img(True, prompt=BASE["prompt"] + tags, steps=4, **size)
        outcome = require_script_ran(infotext)
        fuse = infotext_field(infotext, "OneDiff LoRA fuse") or "not in infotext"
        seconds, its, _ = steps_per_second(ui, args.repeat, True, args.steps, prompt=BASE["prompt"] + tags, **size)
        rows.append({"bench": "lora", "step": label, "fuse": fuse, "graph": outcome, "it/s": its, "s": seconds})
    print(f"\n| {args.checkpoint} {size['width']}x{size['height']}, LoRA {args.lora} | fuse | graph | it/s "
          f"| {args.steps} steps s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['fuse']} | {row['graph']} | {row['it/s']:.2f} | {row['s']:.2f} |")
    return rows


def session(ui: WebUI, args) -> list[dict]:
    with open(args.requests) as file:
        plan = json.load(file)
    rows = []
    for number, request in enumerate(plan, 1):
        ui.select(request["checkpoint"])
        seconds, infotext = ui.txt2img(True, **request["payload"])
        outcome = require_script_ran(infotext)
        rows.append({"bench": "session", "request": number, "checkpoint": request["checkpoint"],
                     "what": request.get("what", ""), "s": seconds, "graphs": outcome})
    compiles = sum(len(re.findall(r"compiled in", row["graphs"])) for row in rows)
    print("\n| # | checkpoint | request | s | OneDiff |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['request']} | {row['checkpoint']} | {row['what']} | {row['s']:.1f} | {row['graphs']} |")
    print(f"\ncompiles over {len(rows)} requests: {compiles}")
    return rows + [{"bench": "session", "compiles": compiles}]


def first_image(ui: WebUI, args) -> list[dict]:
    ui.select(args.checkpoint)
    size = image_size(args)
    seconds, infotext = ui.txt2img(True, [bool(args.quantize), args.cache or "None"], steps=args.steps, **size)
    outcome = require_script_ran(infotext)
    print(f"\n| first image after start ({args.checkpoint}, {args.steps} steps) | s | OneDiff |\n|---|---|---|\n"
          f"| cache {args.cache or 'none'} | {seconds:.1f} | {outcome} |")
    return [{"bench": "first-image", "checkpoint": args.checkpoint, "cache": args.cache, "s": seconds,
             "graphs": outcome}]


def soak_models(start: str) -> set[str]:
    import webui_soak

    return webui_soak.model_names(start == "tiny")


def soak(ui: WebUI, args, started=None) -> list[dict]:
    import webui_soak
    import webui_start

    harness = webui_start.harness()

    def compare(payload: dict) -> tuple[float, int]:
        return harness.difference(ui.image(True, **payload), ui.image(False, **payload))

    args.tiny = (args.start or args.models) == "tiny"
    args.mean_limit, args.max_limit = harness.MEAN_LIMIT, harness.MAX_LIMIT
    return webui_soak.soak(ui, args, started, compare, lambda infotext: infotext_field(infotext) or "not in infotext")


def run_bench(ui: WebUI, args, started) -> list[dict]:
    if args.bench == "soak":
        return soak(ui, args, started)
    return {"speed": speed, "switch": switch, "lora": lora, "session": session, "first-image": first_image}[args.bench](ui, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    parser.add_argument("bench", choices=["speed", "switch", "lora", "session", "first-image", "soak"])
    parser.add_argument("--checkpoint", help="checkpoint name as webui lists it (without extension)")
    parser.add_argument("--to", help="switch: the checkpoint to switch to")
    parser.add_argument("--size", type=int, default=512, help="image height (and width unless --width)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", default="", help="a saved compiler cache to load with the script")
    parser.add_argument("--save-cache", default="", help="speed: save what the first script request compiles as this")
    parser.add_argument("--lora", help="lora: the LoRA's name in webui's Lora folder")
    parser.add_argument("--requests", help="session: JSON file with the list of requests")
    parser.add_argument("--start", choices=["tiny", "full"], help="start a webui with tiny or full-size random "
                        "checkpoints (bench/webui_start.py) instead of using --url")
    parser.add_argument("--models", choices=["tiny", "full"], default="full",
                        help="soak with --url: whether the webui has the tiny or the full-size models' names")
    parser.add_argument("--count", type=int, default=200, help="soak: requests in all")
    parser.add_argument("--stop-at", type=float, default=0, help="soak: start no request after this time (epoch s)")
    parser.add_argument("--reserve", type=float, default=20, help="soak: seconds kept before --stop-at for the end")
    parser.add_argument("--compare-every", type=int, default=9, help="soak: compare every Nth image with eager's "
                        "(9: prime to a round's 28 requests, so the sample goes through every kind of request)")
    parser.add_argument("--eager", action="store_true", help="soak: the same requests without the script (webui's own "
                        "memory over them; the compile and compare checks are skipped)")
    parser.add_argument("--sizes-sd15", help="soak: three WIDTHxHEIGHT, the hires fix goes from the third to the first")
    parser.add_argument("--sizes-sdxl", help="soak: the same for SDXL")
    parser.add_argument("--controlnet", help="speed: with one unit of this ControlNet model (sd-webui-controlnet)")
    parser.add_argument("--quantize", nargs="?", const="auto", choices=["auto", "int8", "fp8"],
                        help="the script's requests with 'Model Quantization(int8) Speed Up', in this format (webui's "
                        "setting, Settings > OneDiff; 'auto': fp8 from compute capability 8.9, else int8)")
    parser.add_argument("--unquantized-first", action="store_true",
                        help="speed --quantize: measure the script unquantized before quantized (the memory rows then "
                        "hold both graphs)")
    parser.add_argument("--webui-option", action="append", default=[], metavar="NAME=JSON",
                        help="set this webui option (/sdapi/v1/options) before the bench, e.g. "
                        "onediff_quantized_weights_in_host_memory=true")
    args = parser.parse_args()
    if args.unquantized_first and not args.quantize:
        parser.error("--unquantized-first orders the script's quantized and unquantized runs: add --quantize")
    options = {}
    for item in args.webui_option:
        name, _, value = item.partition("=")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--webui-option {item!r}: the value must be JSON (true, 3, \"text\")")
    started = None
    if args.start:
        import webui_start

        names = {args.checkpoint, args.to, args.lora, args.controlnet} | (soak_models(args.start) if args.bench == "soak" else set())
        started = webui_start.start_webui(args.start, {name for name in names if name})
        args.url = started.base_url
    try:
        ui = WebUI(args.url, [True] if args.quantize else None)
        if args.quantize:
            options["onediff_quantization_format"] = args.quantize
        if options:
            ui.post("/sdapi/v1/options", options)
        rows = run_bench(ui, args, started)
    finally:
        if started is not None:
            started.stop()
    if args.json:
        with open(args.json, "a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
