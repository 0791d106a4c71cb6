"""Reusing compiled graphs across checkpoints, shapes, hires fix and the refiner, in a real webui v1.10.1 (GitHub issue 3).

Every image made through the script is compared with eager webui's image of the same payload (no script). They count
as equal when the mean absolute difference of their uint8 pixels is <= 1.0 and the largest <= 8: Inductor reorders
float additions, which can move a pixel near a rounding boundary by a step; wrong or stale weights move the mean by tens.
"Clearly different" images differ by a mean of more than 3.

The infotext field ``OneDiff`` reads ``compiled in N s`` when the request compiled a graph, ``reused`` when it compiled
nothing. That alone cannot show that the compiled graph ran (a request that never reached the wrapper compiles nothing
either), so a probe extension, written into webui's extensions folder by the ``ui`` fixture, records for each denoising
step which UNet module the sampler's model held (``CompiledUNet`` or webui's own ``UNetModel``), which checkpoint that
model was, and a checksum of the weights the module actually reads (its ``input_blocks.0.0`` convolution), which the
tests compare with the checkpoint file: the graph ran on the right weights, nothing stale.

The module starts webui afresh (probe loaded, no graph compiled yet) and compiles in file order: tiny-sd15 once, then
tiny-sdxl, then each new SD1.5 shape once. Compiles take 10-60 s each on the CPU.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap

import pytest

np = pytest.importorskip("numpy")

from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from webui_harness import HERE, assert_close, assert_differs  # noqa: E402

SCRIPT = "onediff_diffusion_model"
ARGS = [False, "None", "", False]
REFINER = "tiny-sdxl-refiner"
REFINER_SEED = 4  # tiny-sdxl has seed 3
PROBE = "reuse_probe"
LONG_PROMPT = ", ".join(["a photo of a small grey cat sitting on a red wooden chair"] * 9)  # over 75 tokens

PROBE_SCRIPT = '''
"""Test probe of test_onediff_reuse.py: what UNet each denoising step ran, and on which weights."""
import torch
from modules import script_callbacks

STEPS = []
_pending = {}


def on_cfg_denoiser(params):
    cond = params.text_cond["crossattn"] if isinstance(params.text_cond, dict) else params.text_cond
    _pending.update(x=list(params.x.shape), context=cond.shape[1])


def on_cfg_denoised(params):
    model = params.inner_model.inner_model  # the LatentDiffusion/DiffusionEngine the sampler just called
    unet = model.model.diffusion_model
    eager = unet.__dict__.get("eager", unet)
    conv_in = eager.input_blocks[0][0].weight
    STEPS.append({
        **_pending,
        "checkpoint": model.sd_checkpoint_info.name_for_extra,
        "unet": type(unet).__name__,
        "shares_weights": unet._parameters is eager._parameters,
        "device": str(conv_in.device),
        "conv_in_sum": None if conv_in.is_meta else float(conv_in.detach().double().sum()),
    })


def on_app_started(_demo, app):
    @app.post("/reuse-probe/take")
    def take():
        steps = list(STEPS)
        STEPS.clear()
        return steps


script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="reuse probe")
script_callbacks.on_cfg_denoised(on_cfg_denoised, name="reuse probe")
script_callbacks.on_app_started(on_app_started, name="reuse probe")
'''


# ----- helpers --------------------------------------------------------------------------------------------------------
def request(ui, script_args=None, **payload):
    """(images, infotexts, probe steps) of one txt2img; with ``script_args`` through the script."""
    ui.post("/reuse-probe/take")
    body = dict(payload)
    if script_args is not None:
        body.update(script_name=SCRIPT, script_args=script_args)
    images, data = ui.txt2img(**body)
    steps = ui.post("/reuse-probe/take").json()
    return images, json.loads(data["info"])["infotexts"], steps


def eager(ui, **payload):
    """Eager webui's images; every step ran webui's own UNet."""
    images, texts, steps = request(ui, **payload)
    assert all("OneDiff" not in t for t in texts), texts
    assert steps and {s["unet"] for s in steps} == {"UNetModel"}, steps
    return images


def assert_all_close(images, references, what: str):
    assert len(images) == len(references), f"{what}: {len(images)} images, eager made {len(references)}"
    for i, (image, reference) in enumerate(zip(images, references)):
        assert_close(image, reference, f"{what}, image {i}")


def outcomes(texts) -> set:
    return {field(t) for t in texts}


def assert_outcome(texts, expected: str, what: str):
    """``expected``: "reused", "compiled" (``compiled in N s``) or "either" (not eager, not "not used")."""
    found = outcomes(texts)
    assert len(found) == 1, f"{what}: images of one request disagree: {found}"
    value = found.pop() or ""
    if expected == "reused":
        assert value == "reused", f"{what}: OneDiff: {value!r} (want reused)\n{texts[0]}"
    elif expected == "compiled":
        assert re.fullmatch(r"compiled in [0-9.]+ s", value), f"{what}: OneDiff: {value!r} (want compiled in N s)\n{texts[0]}"
    else:
        assert value == "reused" or value.startswith("compiled in "), f"{what}: OneDiff: {value!r}\n{texts[0]}"


def assert_compiled_steps(steps, checkpoint_sums: dict, what: str):
    """Every step ran a CompiledUNet that shares the weights of the model sampling it, and those weights are the
    checkpoint's (checksum of input_blocks.0.0.weight from the file)."""
    assert steps, f"{what}: the probe saw no denoising step"
    for i, step in enumerate(steps):
        assert step["unet"] == "CompiledUNet", f"{what}, step {i}: ran {step['unet']}, not the compiled UNet: {step}"
        assert step["shares_weights"] and step["device"] != "meta", f"{what}, step {i}: stale module: {step}"
        expected = checkpoint_sums[step["checkpoint"]]
        assert step["conv_in_sum"] == pytest.approx(expected, rel=1e-9, abs=1e-9), (
            f"{what}, step {i}: weights of {step['checkpoint']} expected (sum {expected}), the module holds {step['conv_in_sum']}"
        )


# ----- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui(webui):
    """The shared webui restarted with the probe extension and the refiner checkpoint; both removed afterwards."""
    probe_dir = webui.data_dir / "extensions" / PROBE
    (probe_dir / "scripts").mkdir(parents=True, exist_ok=True)
    (probe_dir / "scripts" / f"{PROBE}.py").write_text(PROBE_SCRIPT)
    ckpt_dir = webui.data_dir / "models" / "Stable-diffusion"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import checkpoints
        checkpoints.build_checkpoint(checkpoints.CONFIGS / "tiny-sdxl.yaml", {str(ckpt_dir / REFINER)!r} + ".safetensors",
                                     {REFINER_SEED}, webui_path={str(webui.webui_path)!r})
    """)
    r = subprocess.run([webui.python, "-c", code], env=webui.env(), cwd=str(webui.data_dir), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"building {REFINER} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    webui.checkpoints[REFINER] = ckpt_dir / f"{REFINER}.safetensors"
    webui.restart()
    assert webui.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert REFINER in {m["model_name"] for m in webui.get("/sdapi/v1/sd-models").json()}
    assert webui.post("/reuse-probe/take").status_code == 200, "the probe extension did not load"
    yield webui
    shutil.rmtree(probe_dir, ignore_errors=True)
    for suffix in (".safetensors", ".yaml"):
        (ckpt_dir / f"{REFINER}{suffix}").unlink(missing_ok=True)
    webui.checkpoints.pop(REFINER, None)
    webui.restart()


@pytest.fixture(scope="module")
def sums(ui):
    """checkpoint name -> float64 sum of model.diffusion_model.input_blocks.0.0.weight in its file."""
    from safetensors import safe_open

    result = {}
    for name, path in ui.checkpoints.items():
        with safe_open(str(path), framework="np") as f:
            result[name] = float(f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").astype(np.float64).sum())
    return result


@pytest.fixture(scope="module")
def sd15_a(ui, sums):
    """tiny-sd15-a: eager image, then the first scripted request (it compiles)."""
    ui.select_checkpoint("tiny-sd15-a")
    reference = eager(ui)
    images, texts, steps = request(ui, ARGS)
    return {"eager": reference, "images": images, "texts": texts, "steps": steps}


@pytest.fixture
def on_a(ui, sd15_a):
    ui.select_checkpoint("tiny-sd15-a")
    return ui


# ----- tests, in the order they run -----------------------------------------------------------------------------------
def test_same_architecture_switch_reuses_graph(ui, sums, sd15_a):
    assert_outcome(sd15_a["texts"], "compiled", "first tiny-sd15-a request")
    assert_compiled_steps(sd15_a["steps"], sums, "tiny-sd15-a")
    assert_all_close(sd15_a["images"], sd15_a["eager"], "tiny-sd15-a")

    ui.select_checkpoint("tiny-sd15-b")
    try:
        reference = eager(ui)
        images, texts, steps = request(ui, ARGS)
        assert "Model: tiny-sd15-b" in texts[0], texts[0]
        assert_outcome(texts, "reused", "tiny-sd15-b after tiny-sd15-a")
        assert_compiled_steps(steps, sums, "tiny-sd15-b")
        assert {s["checkpoint"] for s in steps} == {"tiny-sd15-b"}, steps
        assert_all_close(images, reference, "tiny-sd15-b")
        assert_differs(images[0], sd15_a["images"][0], "tiny-sd15-b's image vs tiny-sd15-a's (same means stale weights)")
    finally:
        ui.select_checkpoint("tiny-sd15-a")


def test_sdxl_and_back_reuses_the_sd15_graph(ui, sums, sd15_a):
    ui.select_checkpoint("tiny-sdxl")
    reference = eager(ui)
    images, texts, steps = request(ui, ARGS)
    assert_outcome(texts, "either", "tiny-sdxl")
    assert_compiled_steps(steps, sums, "tiny-sdxl")
    assert_all_close(images, reference, "tiny-sdxl")

    ui.select_checkpoint("tiny-sd15-a")
    images, texts, steps = request(ui, ARGS)
    assert_outcome(texts, "reused", "tiny-sd15-a after tiny-sdxl")
    assert_compiled_steps(steps, sums, "tiny-sd15-a after tiny-sdxl")
    assert_all_close(images, sd15_a["eager"], "tiny-sd15-a after tiny-sdxl")


def test_checkpoints_loaded_side_by_side_each_run_their_own_weights(ui, sums, sd15_a):
    """With "Maximum number of checkpoints loaded at the same time" at 2, webui builds a second model object for B and
    keeps A's: the compiled graph is bound to whichever object webui samples with, without recompiling, and never runs
    the other object's weights."""
    ui.set_options(sd_checkpoints_limit=2)
    try:
        for name in ("tiny-sd15-b", "tiny-sd15-a", "tiny-sd15-b"):
            ui.select_checkpoint(name)
            reference = eager(ui)
            images, texts, steps = request(ui, ARGS)
            assert_outcome(texts, "reused", f"{name}, two checkpoints loaded")
            assert_compiled_steps(steps, sums, f"{name}, two checkpoints loaded")
            assert_all_close(images, reference, f"{name}, two checkpoints loaded")
        assert "out of 2" in ui.log_text(), "webui did not load a second model object"
    finally:
        ui.set_options(sd_checkpoints_limit=1)
        ui.select_checkpoint("tiny-sd15-a")


SHAPES = {
    # name: (payload, outcome of the first scripted request)
    "72x128 (720x1280 scaled down)": ({"width": 72, "height": 128}, "compiled"),
    "batch size 3": ({"batch_size": 3}, "compiled"),
    "batch size 3, batch count 2": ({"batch_size": 3, "n_iter": 2}, "reused"),  # the batch-3 graph again
    "batch size 1, batch count 2": ({"n_iter": 2}, "reused"),
    "prompt over 75 tokens": ({"prompt": LONG_PROMPT}, "compiled"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_new_shape_compiles_once_and_equals_eager(on_a, sums, name):
    payload, first = SHAPES[name]
    reference = eager(on_a, **payload)
    images, texts, steps = request(on_a, ARGS, **payload)
    assert_outcome(texts, first, f"{name}, first")
    assert_compiled_steps(steps, sums, name)
    assert_all_close(images, reference, name)
    if name == "prompt over 75 tokens":
        assert {s["context"] for s in steps} >= {154}, f"the prompt did not reach 154 tokens: {steps}"
    again, texts, steps = request(on_a, ARGS, **payload)
    assert_outcome(texts, "reused", f"{name}, repeated")
    assert_compiled_steps(steps, sums, f"{name}, repeated")
    assert_all_close(again, reference, f"{name}, repeated")


@pytest.mark.parametrize("form", ["payload", "override_settings"])
def test_negative_guidance_minimum_sigma(on_a, sums, form):
    payload = {"s_min_uncond": 5.0} if form == "payload" else {"override_settings": {"s_min_uncond": 5.0}}
    try:
        reference = eager(on_a, **payload)
        images, texts, steps = request(on_a, ARGS, **payload)
        _, again, _ = request(on_a, ARGS, **payload)
    finally:
        # webui restores an overridden option only when config.json holds it; this one would stay 5.0.
        on_a.set_options(s_min_uncond=0.0)
    # webui writes NGMS when a step skipped the negative prompt (its UNet call then has half the batch).
    assert field(texts[0], "NGMS") == "5.0", texts[0]
    assert_outcome(texts, "either", f"NGMS via {form}")
    assert_compiled_steps(steps, sums, f"NGMS via {form}")
    assert_all_close(images, reference, f"NGMS via {form}")
    assert_outcome(again, "reused", f"NGMS via {form}, repeated")


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.5}


def test_hires_fix_compiles_both_passes(on_a, sums):
    reference = eager(on_a, **HIRES)
    images, texts, steps = request(on_a, ARGS, **HIRES)
    assert images[0].shape == (128, 128, 3), images[0].shape
    assert_outcome(texts, "compiled", "hires fix, first")  # the second pass's 128x128 is new
    assert {tuple(s["x"][2:]) for s in steps} == {(8, 8), (16, 16)}, steps
    assert_compiled_steps(steps, sums, "hires fix")
    assert_all_close(images, reference, "hires fix")
    again, texts, steps = request(on_a, ARGS, **HIRES)
    assert_outcome(texts, "reused", "hires fix, repeated")
    assert_compiled_steps(steps, sums, "hires fix, repeated")
    assert_all_close(again, reference, "hires fix, repeated")


REFINED = {"refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}


def test_refiner_switches_reuse_the_graph(ui, sums):
    """tiny-sdxl base -> tiny-sdxl-refiner (same architecture, other weights) within each request; the next request
    switches back to the base. Each step must run the compiled graph on the weights of the model sampling it."""
    ui.select_checkpoint("tiny-sdxl")
    reference = eager(ui, **REFINED)
    assert sums["tiny-sdxl"] != sums[REFINER]
    for run in range(3):
        images, texts, steps = request(ui, ARGS, **REFINED)
        what = f"refiner run {run + 1}"
        assert field(texts[0], "Refiner") and REFINER in texts[0], texts[0]
        assert_outcome(texts, "either" if run == 0 else "reused", what)
        order = [s["checkpoint"] for s in steps]
        assert order[0] == "tiny-sdxl" and order[-1] == REFINER and order == sorted(order, key=lambda c: c == REFINER), (
            f"{what}: checkpoints per step {order}"
        )
        assert_compiled_steps(steps, sums, what)
        assert_all_close(images, reference, what)
    assert_all_close(eager(ui, **REFINED), reference, "eager after the scripted refiner runs")


def test_always_recompile_compiles_a_known_shape(on_a, sums, sd15_a):
    images, texts, steps = request(on_a, ARGS)
    assert_outcome(texts, "reused", "known shape")
    images, texts, steps = request(on_a, [False, "None", "", True])
    assert_outcome(texts, "compiled", "always_recompile")
    assert_compiled_steps(steps, sums, "always_recompile")
    assert_all_close(images, sd15_a["eager"], "always_recompile")
