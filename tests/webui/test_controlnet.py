"""sd-webui-controlnet v1.1.455 with the script, in a real webui v1.10.1 on the CPU: ControlNet and T2I-Adapter units
run through the compiled residual pass, equal to eager webui with ControlNet, and nothing compiles again when units,
weights, hints, start/end or their number change, or when ControlNet is turned off and on.

The models are tiny and random (``checkpoints.py``): ``tiny-sd15-cn`` and ``tiny-sdxl-cn`` have SD1.5's and SDXL's full
UNet topologies at a narrow width, and the test extension ``extensions/tiny_controlnet_config`` points ControlNet's model
guesser at those widths. Offline,
the preprocessor is ``none``: the hint image is given.
"""
from __future__ import annotations

import re

import pytest

from sd_webui_onediff.bench.image_quality import ssim  # noqa: E402
from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from test_onediff_quantization import MIN_SSIM  # noqa: E402
from test_onediff_script import infotext, init_image  # noqa: E402
from test_webui_bench import run_bench  # noqa: E402
from webui_harness import MEAN_LIMIT, assert_close, assert_differs, encode_image  # noqa: E402

SCRIPT = "onediff_diffusion_model"
CONTROLNET = "tiny-controlnet-sd15"
SDXL_CONTROLNET = "tiny-controlnet-sdxl"
T2I_ADAPTER = "tiny-t2i-adapter-sd15"
HINT = encode_image(init_image())
OTHER_HINT = encode_image(init_image().transpose(1, 0, 2)[:, ::-1].copy())


@pytest.fixture(scope="module")
def ui(webui_factory):
    ui = webui_factory(start=False)
    ui.add_controlnet()
    ui.start()
    ui.select_checkpoint("tiny-sd15-cn")
    return ui


@pytest.fixture
def sdxl_ui(ui):
    ui.select_checkpoint("tiny-sdxl-cn")
    yield ui
    ui.select_checkpoint("tiny-sd15-cn")


def unit(model: str = CONTROLNET, **settings) -> dict:
    return {"enabled": True, "module": "none", "model": model, "image": HINT, "weight": 1.0, "resize_mode": "Crop and Resize",
            "processor_res": 64, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
            "control_mode": "Balanced", **settings}


def with_units(*units) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


def generate(ui, scripted: bool, units=(), script_args=None):
    payload = with_units(*units) if units else {}
    if scripted:
        payload["script_name"] = SCRIPT
        if script_args is not None:
            payload["script_args"] = script_args
    images, data = ui.txt2img(**payload)  # with ControlNet, its detected maps follow the image
    image, text = images[0], infotext(data)
    if units:
        assert "ControlNet 0" in text, f"ControlNet did not run: {text}"
    return image, field(text) or ""


def test_controlnet_and_t2i_adapter_units_compiled_equal_to_eager_and_never_recompiled(ui):
    without, _ = generate(ui, scripted=False)
    image, done = generate(ui, scripted=True)
    assert done.startswith("compiled") or done == "reused", done
    assert_close(image, without, "script without ControlNet vs eager")

    first = [unit()]
    eager, _ = generate(ui, scripted=False, units=first)
    assert_differs(eager, without, "the ControlNet unit")
    image, done = generate(ui, scripted=True, units=first)
    assert done.startswith("compiled"), f"the residual pass compiles once: {done}"
    assert_close(image, eager, "script with a ControlNet unit vs eager")

    variations = {  # kept few: each is an eager and a scripted request
        "weight 0.5, start/end 0.3-0.8": [unit(weight=0.5, guidance_start=0.3, guidance_end=0.8)],
        "cfg injection": [unit(control_mode="ControlNet is more important")],
        "T2I-Adapter": [unit(T2I_ADAPTER)],
        "two units, another hint, soft injection": [
            unit(weight=0.7, image=OTHER_HINT, control_mode="My prompt is more important"), unit(T2I_ADAPTER, weight=0.8)],
    }
    for what, units in variations.items():
        eager, _ = generate(ui, scripted=False, units=units)
        image, done = generate(ui, scripted=True, units=units)
        assert done == "reused", f"{what}: {done}"
        assert_close(image, eager, f"script vs eager, {what}")
        if what == "T2I-Adapter":
            assert_differs(eager, without, "the T2I-Adapter unit")

    image, done = generate(ui, scripted=True)
    assert done == "reused", f"ControlNet off again: {done}"
    assert_close(image, without, "script after ControlNet, without it, vs eager")
    image, done = generate(ui, scripted=True, units=first)
    assert done == "reused", f"ControlNet on again: {done}"


def test_attention_changing_units_run_eagerly_with_the_reason(ui):
    reference = [unit(module="reference_only", model="None", threshold_a=0.5)]
    eager, _ = generate(ui, scripted=False, units=reference)
    image, done = generate(ui, scripted=True, units=reference)
    assert done.startswith("eager, ") and "AttentionInjection" in done, done
    assert_close(image, eager, "script with a reference-only unit vs eager")


def test_the_benchmark_measures_a_controlnet_unit_without_recompiles(ui, tmp_path):
    """``bench/webui_bench.py speed --controlnet``, as run on the GPU, on the tiny models (timings mean nothing here)."""
    out, (row, variations) = run_bench(ui, tmp_path, "speed", "--checkpoint", "tiny-sd15-cn", "--controlnet", CONTROLNET)
    assert row["image difference mean"] <= MEAN_LIMIT, row
    assert variations["recompiles"] == 0 and "recompiles | | 0 |" in out, (variations, out)


def test_a_controlnet_unit_on_the_quantized_unet(ui):
    """"Model Quantization(int8) Speed Up" with a ControlNet unit: the residual pass, an entry of its own, chooses the
    UNet's layers on its first call and compiles once; a varied unit reuses it. Images close to eager webui's with the
    unit, by the quantization tests' SSIM (``test_onediff_quantization.py``). int8 set explicitly: the default "auto"
    keeps SD1.x unquantized."""
    with ui.options_set(onediff_quantization_format="int8"):
        for run, units in enumerate(([unit()], [unit(weight=0.5, guidance_start=0.3, guidance_end=0.8)])):
            eager, _ = generate(ui, scripted=False, units=units)
            image, done = generate(ui, scripted=True, units=units, script_args=[True])
            outcome = r"compiled in [0-9.]+ s" if run == 0 else "reused"
            assert re.fullmatch(rf"{outcome}, int8 \d+ layers", done), f"request {run + 1}: {done}"
            score = ssim(image, eager)
            assert score >= MIN_SSIM, f"request {run + 1}: SSIM {score:.4f} against eager with ControlNet"


def test_sdxl_controlnet_unit_compiled_equal_to_eager_and_not_recompiled_when_varied(sdxl_ui):
    without, _ = generate(sdxl_ui, scripted=False)
    first = [unit(SDXL_CONTROLNET)]
    eager, _ = generate(sdxl_ui, scripted=False, units=first)
    assert "controlnet_sdxl_mid_config" in sdxl_ui.log_text(), "ControlNet's guesser did not take its SDXL mid config"
    assert_differs(eager, without, "the SDXL ControlNet unit")
    image, done = generate(sdxl_ui, scripted=True, units=first)
    assert done.startswith("compiled"), f"the SDXL residual pass compiles once: {done}"
    assert_close(image, eager, "script with an SDXL ControlNet unit vs eager")

    varied = [unit(SDXL_CONTROLNET, weight=0.5, guidance_start=0.3, guidance_end=0.8)]
    eager, _ = generate(sdxl_ui, scripted=False, units=varied)
    image, done = generate(sdxl_ui, scripted=True, units=varied)
    assert done == "reused", f"weight 0.5, start/end 0.3-0.8: {done}"
    assert_close(image, eager, "script vs eager, SDXL ControlNet at weight 0.5, start/end 0.3-0.8")
