"""The "Model Quantization(int8) Speed Up" checkbox in a real webui v1.10.1 on the CPU (int8; the CPU has no fp8).

Quantized images are not equal to eager webui's: each 8-bit layer's output moves by about 1 %. They count as close when
their SSIM against eager webui's image of the same request is at least MIN_SSIM (``bench/image_quality.py``); and as
"changed by quantization" when they differ from the unquantized compiled image by more than CHANGED: the tiny models'
64x64 images move less than full-size ones, within the compiled-vs-eager limits of ``webui_harness.assert_close``. A
quantized generation that compiles nothing reads ``OneDiff: reused, int8 N layers``; N is the same for every
generation of the structure (the layers are chosen once).

The module compiles tiny SD1.5 twice (unquantized, then int8), and every later SD1.5 request reuses one of those graphs;
its last test compiles tiny SDXL the same two ways. It restarts webui when it ends, so that its compiled entries do not
count in later modules' registries. The format setting is int8 throughout, except where a test says otherwise: its
default, "auto", keeps SD1.x unquantized.
"""
from __future__ import annotations

import json
import re

import pytest

np = pytest.importorskip("numpy")

from sd_webui_onediff.bench.image_quality import ssim  # noqa: E402
from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from webui_harness import assert_close, assert_differs, difference  # noqa: E402

SCRIPT = "onediff_diffusion_model"
PLAIN = [False, "None", "", False]
QUANTIZED = [True, "None", "", False]
PROMPT = "a photo of a cat"
LORA = "<lora:tiny-lora-sd15:1>"
MIN_SSIM = 0.95
CHANGED = 0.1
"""Mean absolute uint8 difference from the unquantized compiled image above which quantization changed the image:
here the unquantized compiled image is within 1e-4 of eager's on average, and int8 moves it by 0.8 (largest 6)."""
FORMAT_OPTION = "onediff_quantization_format"
HOST_MEMORY_OPTION = "onediff_quantized_weights_in_host_memory"


def generate(ui, script_args=None, prompt: str = PROMPT, **payload):
    """(image, infotext) of one 64x64, 4-step txt2img; through the script when ``script_args`` is given."""
    body = {"prompt": prompt, **payload}
    if script_args is not None:
        body.update(script_name=SCRIPT, script_args=script_args)
    (image,), data = ui.txt2img(**body)
    text = json.loads(data["info"])["infotexts"][0]
    assert (script_args is None) == ("OneDiff" not in text), text
    return image, text


def quantized_layers(text: str, outcome: str = "reused") -> int:
    """N of ``OneDiff: <outcome>, int8 N layers``; ``outcome`` "compiled" stands for ``compiled in S s``."""
    value = field(text) or ""
    pattern = r"compiled in [0-9.]+ s" if outcome == "compiled" else re.escape(outcome)
    match = re.fullmatch(rf"{pattern}, int8 (\d+) layers", value)
    assert match, f"OneDiff: {value!r} (want '{outcome}, int8 N layers')\n{text}"
    return int(match.group(1))


def assert_similar(image, reference, what: str) -> None:
    score = ssim(image, reference)
    assert score >= MIN_SSIM, f"{what}: SSIM {score:.4f} against eager (want >= {MIN_SSIM})"


def assert_quantization_changed(image, unquantized, what: str) -> None:
    mean, _ = difference(image, unquantized)
    assert mean > CHANGED, f"{what}: mean difference only {mean:.4f} (want > {CHANGED}): was anything quantized?"


@pytest.fixture(scope="module")
def ui(webui):
    webui.select_checkpoint("tiny-sd15-a")
    assert webui.options().get(FORMAT_OPTION) == "auto", "the format setting is missing or not 'auto'"
    with webui.options_set(**{FORMAT_OPTION: "int8"}):  # "auto" keeps SD1.x unquantized (test_the_checked_box_...)
        yield webui
    webui.restart()


@pytest.fixture(scope="module")
def first(ui):
    """tiny-sd15-a: eager webui's image, the unquantized compiled one, then the first quantized one (it compiles)."""
    eager, _ = generate(ui)
    plain, _ = generate(ui, PLAIN)
    quantized, text = generate(ui, QUANTIZED)
    return {"eager": eager, "plain": plain, "quantized": quantized, "text": text}


@pytest.fixture
def on_a(ui, first):
    ui.select_checkpoint("tiny-sd15-a")
    return ui


# ----- tests, in the order they run -----------------------------------------------------------------------------------
def test_quantized_txt2img_is_close_to_eager_and_changed(on_a, first):
    layers = quantized_layers(first["text"], "compiled")
    assert layers > 0, first["text"]
    assert_similar(first["quantized"], first["eager"], "quantized vs eager")
    assert_close(first["plain"], first["eager"], "unquantized compiled vs eager")
    assert_quantization_changed(first["quantized"], first["plain"], "quantized vs unquantized compiled")
    print(f"\nint8, {layers} layers: SSIM vs eager {ssim(first['quantized'], first['eager']):.4f}, "
          f"vs unquantized (mean, max) {difference(first['quantized'], first['plain'])}")


def test_second_quantized_generation_reuses_graph_and_layers(on_a, first):
    image, text = generate(on_a, QUANTIZED)
    assert quantized_layers(text) == quantized_layers(first["text"], "compiled")
    assert np.array_equal(image, first["quantized"]), f"same request, other image: {difference(image, first['quantized'])}"


def test_lora_on_the_quantized_model(on_a, first):
    """The LoRA is fused into the fp16 weights, and the 8-bit copies of the layers it changed are written again; when
    it goes, the weights are restored exactly and so are the 8-bit copies (after eager webui's LoRA request: webui
    leaves the LoRA in the weights, and the next generation finds the changed layers when it starts)."""
    image, text = generate(on_a, QUANTIZED, prompt=f"{PROMPT} {LORA}")
    quantized_layers(text)
    assert re.fullmatch(r"\d+ ms", field(text, "OneDiff LoRA fuse") or ""), text
    eager, _ = generate(on_a, prompt=f"{PROMPT} {LORA}")
    assert_similar(image, eager, "quantized with LoRA vs eager with LoRA")
    assert_differs(image, first["quantized"], "quantized with LoRA vs without")
    again, text = generate(on_a, QUANTIZED)
    quantized_layers(text)
    assert np.array_equal(again, first["quantized"]), f"LoRA not removed exactly: {difference(again, first['quantized'])}"


def test_full_precision_weights_in_cpu_memory(on_a, first):
    """The setting that parks the 8-bit layers' full-precision weights in host memory (``compile/host_memory.py``;
    on the CPU, host memory is all there is: the GPU memory it saves is measured by ``bench/quant_bench.py``). The
    same images, with and without a LoRA, which comes and goes through the parked weights; webui's eager generation
    after it brings the weights back first."""
    with on_a.options_set(**{HOST_MEMORY_OPTION: True}):
        image, text = generate(on_a, QUANTIZED)
        layers = quantized_layers(first["text"], "compiled")
        assert field(text) == f"reused, int8 {layers} layers (full precision in CPU memory)", text
        assert np.array_equal(image, first["quantized"]), difference(image, first["quantized"])
        with_lora, _ = generate(on_a, QUANTIZED, prompt=f"{PROMPT} {LORA}")
        assert_differs(with_lora, first["quantized"], "quantized with LoRA vs without")
        again, _ = generate(on_a, QUANTIZED)
        assert np.array_equal(again, first["quantized"]), f"LoRA not removed exactly: {difference(again, first['quantized'])}"
        eager, _ = generate(on_a)
        assert np.array_equal(eager, first["eager"]), difference(eager, first["eager"])
    reference, _ = generate(on_a, QUANTIZED, prompt=f"{PROMPT} {LORA}")
    assert np.array_equal(with_lora, reference), f"LoRA with parked weights: {difference(with_lora, reference)}"


def test_same_architecture_checkpoint_switch(ui, first):
    """tiny-sd15-b has a config file of its own, so webui builds a new model object for it: the layers chosen for
    tiny-sd15-a are quantized in it and the graph is reused. Weights loaded into the same model, which this webui test
    cannot reach, are rewritten too: ``tests/test_quantization.py::test_quantized_entries_reuse_the_plan_and_keep_weights_in_step``."""
    ui.select_checkpoint("tiny-sd15-b")
    try:
        eager, _ = generate(ui)
        image, text = generate(ui, QUANTIZED)
        assert "Model: tiny-sd15-b" in text, text
        assert quantized_layers(text) == quantized_layers(first["text"], "compiled")
        assert_similar(image, eager, "tiny-sd15-b quantized vs eager")
        assert_differs(image, first["quantized"], "tiny-sd15-b quantized vs tiny-sd15-a quantized (same: stale 8-bit weights)")
    finally:
        ui.select_checkpoint("tiny-sd15-a")
    image, text = generate(ui, QUANTIZED)
    quantized_layers(text)
    assert np.array_equal(image, first["quantized"]), f"back on tiny-sd15-a: {difference(image, first['quantized'])}"


@pytest.mark.parametrize("format, why", [
    ("fp8", "fp8 quantization needs an NVIDIA GPU of compute capability 8.9 or newer"),
    ("auto", "the format 'auto' quantizes SDXL only (8 bits measured no faster on SD1.5)"),
], ids=["fp8 on the CPU", "auto on SD1.5"])
def test_the_checked_box_compiles_unquantized_and_says_why(on_a, first, format, why):
    """A format the device cannot run, and the default, "auto", on SD1.5 (it quantizes SDXL only: README,
    Quantization): the unquantized compiled image, and the infotext says why (int8 quantizes it: the tests above)."""
    with on_a.options_set(**{FORMAT_OPTION: format}):
        image, text = generate(on_a, QUANTIZED)
    assert field(text) == f"reused, not quantized: {why}", text
    assert np.array_equal(image, first["plain"]), f"not the unquantized compiled image: {difference(image, first['plain'])}"


@pytest.mark.parametrize("script_args", [[True], [{"0": True}]], ids=["[true]", "[{0: true}]"])
def test_onediff_api_forms_turn_quantization_on(on_a, first, script_args):
    image, text = generate(on_a, script_args)
    assert quantized_layers(text) == quantized_layers(first["text"], "compiled")
    assert np.array_equal(image, first["quantized"]), difference(image, first["quantized"])


def test_auto_quantizes_sdxl(on_a):
    """"auto" on an SDXL checkpoint: quantized, in int8 on the CPU (fp8 on cards of compute capability 8.9 and newer),
    close to eager webui's image and not the unquantized compiled one. Decided for the model that samples: the
    quantized request loads tiny SDXL through ``override_settings`` while tiny SD1.5, which "auto" keeps unquantized,
    is the model loaded when the script starts (webui keeps SDXL loaded after it)."""
    sdxl = {"override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    with on_a.options_set(**{FORMAT_OPTION: "auto"}):
        quantized, text = generate(on_a, QUANTIZED, **sdxl)
        eager, _ = generate(on_a, **sdxl)
        plain, _ = generate(on_a, PLAIN, **sdxl)
    assert "Model: tiny-sdxl" in text, text
    assert quantized_layers(text, "compiled") > 0, text
    assert_similar(quantized, eager, "tiny SDXL, auto (int8) vs eager")
    assert_quantization_changed(quantized, plain, "tiny SDXL, auto (int8) vs unquantized compiled")
