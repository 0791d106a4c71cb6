"""The ``onediff_diffusion_model`` Script in a real webui v1.10.1, through its HTTP API, on the CPU.

Equality metric, compiled vs eager image of the same request: mean absolute difference of the uint8 pixels <= 1.0 and
largest difference <= 8. Inductor reorders float additions and fuses kernels (UNet outputs differ by ~1e-7 relative),
so a pixel near a rounding boundary can move by one step; over 4 sampler steps that stays at 0-2 values of 12288 off by 1.
A broken graph (wrong weights, missing LoRA, wrong attention) moves the mean by tens.

Eager before vs after a scripted run: the compiled wrapper re-lays the eager UNet's convolution weights in
channels-last order for its calls (``CompileOptions.channels_last``) and lays them back after the generation; eager
images after a scripted run are held to the same metric. That the eager UNet is back in place is checked directly: a
plain request at a size never compiled logs no OneDiff line at all.

Compiles take 10-60 s here, so the tests share one webui: SD1.5 compiles once (fixture ``first_compile``) and the
other SD1.5 tests reuse that graph; SDXL compiles once; the cache-timing and compile-failure tests restart webui with an
empty TORCHINDUCTOR_CACHE_DIR each and compile again (at the end the original environment is put back). They run in
file order; fixtures make any subset (``-k``) work too.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid

import pytest

np = pytest.importorskip("numpy")

from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from webui_harness import assert_close  # noqa: E402

SCRIPT = "onediff_diffusion_model"
DEFAULT_ARGS = [False, "None", "", False]


# ----- helpers --------------------------------------------------------------------------------------------------------
def infotext(data: dict) -> str:
    return json.loads(data["info"])["infotexts"][0]


def onediff(text: str) -> str:
    return field(text) or ""


def compile_seconds(value: str) -> float:
    match = re.search(r"compiled in ([0-9.]+) s", value or "")
    assert match, f"no compile time in {value!r}"
    return float(match.group(1))


def scripted(webui, form: str = "script_name", script_args=None, **payload):
    """txt2img through our script; ``form`` is webui's ``script_name`` or OneDiff's ``script``."""
    body = {form: SCRIPT, **payload}
    if script_args is not None:
        body["script_args"] = script_args
    (image,), data = webui.txt2img(**body)
    return image, infotext(data)


def plain(webui, **payload):
    (image,), data = webui.txt2img(**payload)
    text = infotext(data)
    assert "OneDiff" not in text, f"a request without the script ran it: {text}"
    return image


def init_image():
    """A 64x64 RGB image with gradients and a disc, for img2img."""
    y, x = np.mgrid[0:64, 0:64]
    disc = ((x - 40) ** 2 + (y - 24) ** 2 < 15 ** 2) * 120
    return np.stack([x * 4, y * 4, (255 - x * 2 - disc)], axis=-1).clip(0, 255).astype(np.uint8)


def fresh_env(webui, **extra) -> dict:
    """webui's environment with an empty Inductor cache dir, so that every compile starts from nothing."""
    directory = webui.data_dir.parent / f"inductor-{uuid.uuid4().hex[:8]}"
    return {**webui.extra_env, "TORCHINDUCTOR_CACHE_DIR": str(directory), **extra}


def onediff_lines_during(webui, request):
    """Runs ``request()`` and returns the OneDiff lines webui logged meanwhile."""
    before = len(webui.log_text())
    request()
    return [line for line in webui.log_text()[before:].splitlines() if "OneDiff" in line]


# ----- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui(webui):
    """The shared webui, with compiler caches under its data dir; afterwards the environment it came with is put back."""
    original_env = dict(webui.extra_env)
    webui.cache_dir = webui.data_dir / "compiler-caches"
    webui.set_options(onediff_compiler_caches_path=str(webui.cache_dir))
    yield webui
    if webui.extra_env != original_env:
        webui.restart(env=original_env)


@pytest.fixture(scope="module")
def eager_before(ui):
    """SD1.5 images made before any scripted run (in this process): txt2img and img2img."""
    if "OneDiff" in ui.log_text(since_start=True):
        ui.restart()
    ui.select_checkpoint("tiny-sd15-a")
    txt = plain(ui)
    (img,), data = ui.img2img(init_image())
    assert "OneDiff" not in infotext(data)
    return {"txt2img": txt, "img2img": img}


@pytest.fixture(scope="module")
def first_compile(ui, eager_before):
    """The first scripted SD1.5 txt2img (webui's ``script_name`` form, empty ``script_args``): it compiles."""
    ui.select_checkpoint("tiny-sd15-a")
    return scripted(ui, "script_name", script_args=[])


@pytest.fixture
def sd15_ui(ui, first_compile):
    """SD1.5 selected, its UNet compiled in this process."""
    ui.select_checkpoint("tiny-sd15-a")
    return ui


# ----- tests, in the order they run -----------------------------------------------------------------------------------
def test_script_is_selectable_in_txt2img_and_img2img(ui):
    scripts = ui.scripts()
    assert SCRIPT in scripts["txt2img"], scripts["txt2img"]
    assert SCRIPT in scripts["img2img"], scripts["img2img"]


def test_txt2img_both_request_forms_compile_then_reuse(sd15_ui, first_compile, eager_before):
    first, text = first_compile
    assert "OneDiff: compiled in " in text and compile_seconds(onediff(text)) > 0, text
    assert_close(first, eager_before["txt2img"], "txt2img script_name vs eager")

    second, text = scripted(sd15_ui, "script")  # OneDiff's form, no script_args
    assert field(text) == "reused", text
    assert np.array_equal(first, second), "the same compiled graph gave two different images"


def test_img2img_both_request_forms(sd15_ui, eager_before):
    for form in ("script_name", "script"):
        (image,), data = sd15_ui.img2img(init_image(), **{form: SCRIPT, "script_args": DEFAULT_ARGS})
        text = infotext(data)
        assert field(text) == "reused", f"{form}: {text}"  # same latent shape as txt2img: the same graph
        assert_close(image, eager_before["img2img"], f"img2img {form} vs eager")


def test_bad_script_args_get_422_naming_the_argument(sd15_ui):
    cases = [
        ({"script_name": SCRIPT, "script_args": ["yes"]}, "quantization"),
        ({"script_name": SCRIPT, "script_args": [False, 5]}, "compiler_cache"),
        ({"script": SCRIPT, "script_args": [False, "None", "", "always"]}, "always_recompile"),
    ]
    for body, name in cases:
        r = sd15_ui.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 4, **body})
        assert r.status_code == 422, (body, r.status_code, r.text[:500])
        assert name in r.text, (body, r.text)
    _, text = scripted(sd15_ui, script_args=DEFAULT_ARGS)
    assert field(text) == "reused", "the request after the 422s did not work normally: " + text


def test_bad_script_args_in_img2img_get_422(sd15_ui):
    body = {"init_images": [], "prompt": "a cat", "script": SCRIPT, "script_args": [False, ["list"]]}
    r = sd15_ui.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and "compiler_cache" in r.text, (r.status_code, r.text[:500])


@pytest.mark.parametrize("args", [[False], [{"0": False}], [False, None, ""]])
def test_historic_script_args_forms(sd15_ui, eager_before, args):
    """Unquantized forms; ``[true]`` and ``[{"0": true}]`` quantize (``test_onediff_quantization.py``)."""
    image, text = scripted(sd15_ui, script_args=args)
    assert field(text) == "reused", text
    assert_close(image, eager_before["txt2img"], f"{args} vs eager")


def test_webuiapi_client_unchanged(sd15_ui):
    import webuiapi  # tests/requirements.txt: the unchanged PyPI client is what this test is about
    api = webuiapi.WebUIApi(host="127.0.0.1", port=sd15_ui.port)
    common = dict(prompt="a photo of a cat", width=64, height=64, steps=4, seed=1234)
    result = api.txt2img(script_name=SCRIPT, script_args=[False, "None", "", False], **common)
    text = result.info["infotexts"][0]
    assert field(text) == "reused", text
    eager = api.txt2img(**common)
    assert "OneDiff" not in eager.info["infotexts"][0]
    assert_close(np.array(result.image.convert("RGB")), np.array(eager.image.convert("RGB")), "webuiapi compiled vs eager")


def test_builtin_lora_with_the_compiled_unet(sd15_ui):
    """Webui's builtin Lora extension loads next to ours (its API lists the LoRAs, startup recorded no error from it or
    us) and a <lora:...> prompt through our script changes the image like the eager run does, without recompiling:
    OneDiff fuses the LoRA into the weights with the builtin ``networks`` module's own function ("OneDiff LoRA fuse")."""
    ui = sd15_ui
    assert ui.post("/sdapi/v1/refresh-loras").status_code == 200
    assert "tiny-lora-sd15" in {entry["name"] for entry in ui.get("/sdapi/v1/loras").json()}
    exceptions = json.loads(ui.get("/internal/sysinfo").text)["Exceptions"]
    # webui also records that a checkout without an 'origin' remote (a worktree, a local clone) has no remote URL
    suspicious = [e for e in map(json.dumps, exceptions)
                  if re.search(r"lora|network|onediff", e, re.IGNORECASE) and "extension data from Git" not in e]
    assert not suspicious, suspicious

    lora_prompt = "a cat <lora:tiny-lora-sd15:1>"
    without, text = scripted(ui, prompt="a cat")
    assert field(text) == "reused", text
    with_lora, text = scripted(ui, prompt=lora_prompt)
    assert field(text) == "reused", "a LoRA made the UNet recompile: " + text
    assert field(text, "Lora hashes") and "tiny-lora-sd15" in text, text
    assert field(text, "OneDiff LoRA fuse"), text
    assert np.abs(with_lora.astype(int) - without).mean() > 1, "the LoRA did not change the compiled image"
    (eager_lora,), _ = ui.txt2img(prompt=lora_prompt)
    assert_close(with_lora, eager_lora, "LoRA compiled vs eager")

    again, text = scripted(ui, prompt="a cat")
    assert field(text) == "reused", text
    assert np.array_equal(again, without), "the LoRA stayed in the weights after the prompt dropped it"


def test_eager_unet_is_back_after_scripted_runs(sd15_ui, eager_before):
    image = plain(sd15_ui)
    assert_close(image, eager_before["txt2img"], "eager after scripted runs vs eager before")
    lines = onediff_lines_during(sd15_ui, lambda: plain(sd15_ui, width=72))
    assert not lines, f"a plain request at a new size went through the compiled UNet: {lines}"


def test_sdxl_compiled_equals_eager(ui):
    ui.select_checkpoint("tiny-sdxl")
    eager = plain(ui)
    image, text = scripted(ui, script_args=DEFAULT_ARGS)
    assert onediff(text).startswith("compiled in "), text
    assert_close(image, eager, "tiny-sdxl compiled vs eager")
    again, text = scripted(ui, "script")
    assert field(text) == "reused" and np.array_equal(again, image), text


@pytest.fixture(scope="module")
def saved_t1(ui, first_compile):
    """Saves what this process compiled as cache "t1"; returns the run's infotext."""
    ui.select_checkpoint("tiny-sd15-a")
    _, text = scripted(ui, script_args=[False, "None", "t1", False])
    return text


def test_compiler_cache_save_missing_damaged(sd15_ui, saved_t1):
    ui = sd15_ui
    # When the SDXL test ran before, this is a new SD1.5 model object, rebound to the graph compiled before: "reused".
    assert field(saved_t1) == "reused", saved_t1
    assert (ui.cache_dir / "t1.torchcache").stat().st_size > 0
    assert json.loads((ui.cache_dir / "t1.json").read_text())["environment"]["device"] == "cpu"

    image, text = scripted(ui, script_args=[False, "no-such-cache", "", False])
    assert "cache no-such-cache not found" in onediff(text), text

    shutil.copyfile(ui.cache_dir / "t1.json", ui.cache_dir / "broken.json")
    (ui.cache_dir / "broken.torchcache").write_bytes(b"\x00garbage, not a torch cache" * 100)
    image, text = scripted(ui, script_args=[False, "broken", "", False])
    assert "cache broken damaged" in onediff(text), text
    assert image.std() > 1


def test_compiler_cache_makes_a_fresh_compile_faster(ui, saved_t1):
    """Each run in a new process with an empty Inductor cache dir: only the saved cache can make it faster. On the CPU
    the cache skips Dynamo/AOT/Inductor's code generation but not the C++ compile of the kernels, so the gain is a
    fraction (measured ~20%), not the many-fold gain of a CUDA cache that bundles its Triton kernels."""
    seconds = {}
    for cache in ("t1", "None"):
        ui.restart(env=fresh_env(ui))
        ui.select_checkpoint("tiny-sd15-a")
        _, text = scripted(ui, script_args=[False, cache, "", False])
        expected = "loaded cache t1, compiled in " if cache == "t1" else "compiled in "
        assert onediff(text).startswith(expected), text
        seconds[cache] = compile_seconds(onediff(text))
    print(f"\nfresh SD1.5 compile: {seconds['t1']:.1f} s with cache t1, {seconds['None']:.1f} s without")
    assert seconds["t1"] < seconds["None"], seconds


def test_compile_failure_runs_eagerly_and_interrupt_restores(ui):
    """No working C++ compiler (CXX names a missing one: what a CPU user without a compiler hits), fresh cache dir."""
    ui.restart(env=fresh_env(ui, CXX="/nonexistent/g++"))
    ui.select_checkpoint("tiny-sd15-a")
    before = plain(ui)
    image, text = scripted(ui, script_args=DEFAULT_ARGS)
    assert onediff(text).startswith("eager, compile failed: "), text
    assert "C++ compiler" in onediff(text), text
    assert_close(image, before, "eager fallback vs eager")
    log = ui.log_text(since_start=True)
    assert "ERROR:sd_webui_onediff.compile.engine:" in log, "our packages are not loaded as sd_webui_onediff.*"
    assert_close(plain(ui), before, "eager after a failed compile vs before")
    assert not onediff_lines_during(ui, lambda: plain(ui, width=72)), "the wrapper stayed after a failed run"

    # Interrupted while compiling (webui's Interrupt button): the run ends, the eager UNet is back.
    start = len(ui.log_text())
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=scripted(ui, script_args=DEFAULT_ARGS, steps=8)))
    worker.start()
    deadline = time.monotonic() + 120
    while "OneDiff: compiling" not in ui.log_text()[start:] and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.2)
    assert ui.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(300)
    assert "out" in result, "the interrupted request did not answer"
    assert onediff(result["out"][1]).startswith("eager, compile failed: "), result["out"][1]
    assert not onediff_lines_during(ui, lambda: plain(ui, width=80)), "the wrapper stayed after an interrupted run"
    assert_close(plain(ui), before, "eager after an interrupted run vs before")
    full = plain(ui, steps=8)
    assert np.abs(result["out"][0].astype(int) - full).mean() > 1, "the interrupt did not stop the sampling"
