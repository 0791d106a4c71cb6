"""LoRA with the OneDiff script in a real webui: compiled images match eager webui's, switching LoRAs never recompiles.

Every comparison is the script (``script_name: onediff_diffusion_model``) against eager webui (no script) for the same
seed and prompt. Compiled and eager images count as equal when the mean absolute difference of their uint8 pixels is
at most 1.0 and the largest at most 8 (Inductor reorders float math; the tiny models amplify nothing beyond that).
The LoRA files are made here (checkpoints.build_lora, kohya naming) and put into the webui's models/Lora.
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap

import pytest

np = pytest.importorskip("numpy")

from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from webui_harness import HERE, assert_close, assert_differs, difference  # noqa: E402

SCRIPT = {"script_name": "onediff_diffusion_model", "script_args": [False, "None", "", False]}
PROMPT = "a photo of a cat"

OTHER_KINDS = ("loha", "lokr", "ia3", "full", "oft", "norm")
"""Network types besides plain LoRA (checkpoints.NETWORK_KINDS), each a UNet-only file for tiny SD1.5."""

# name -> (config, seed, parts, network kind)
LORAS = {
    "odl-sd15-unet": ("tiny-sd15.yaml", 21, ("unet",), "lora"),
    "odl-sd15-unet-b": ("tiny-sd15.yaml", 22, ("unet",), "lora"),
    "odl-sd15-te": ("tiny-sd15.yaml", 23, ("te",), "lora"),
    "odl-sd15-both": ("tiny-sd15.yaml", 24, ("unet", "te"), "lora"),
    "odl-sdxl-unet": ("tiny-sdxl.yaml", 25, ("unet",), "lora"),
    "odl-sdxl-te": ("tiny-sdxl.yaml", 26, ("te",), "lora"),
    "odl-sdxl-both": ("tiny-sdxl.yaml", 27, ("unet", "te"), "lora"),
    **{f"odl-sd15-{kind}": ("tiny-sd15.yaml", 30 + i, ("unet",), kind) for i, kind in enumerate(OTHER_KINDS)},
}


@pytest.fixture(scope="module")
def loras(webui):
    """Builds LORAS into <data_dir>/models/Lora with webui's python (it has ldm/sgm) and makes webui list them."""
    lora_dir = webui.data_dir / "models" / "Lora"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import checkpoints
        for name, (config, seed, parts, kind) in {LORAS!r}.items():
            checkpoints.build_lora(checkpoints.CONFIGS / config, {str(lora_dir)!r} + f"/{{name}}.safetensors", seed,
                                   webui_path={str(webui.webui_path)!r}, parts=parts, kind=kind)
    """)
    r = subprocess.run([webui.python, "-c", code], env=webui.env(), cwd=str(webui.data_dir), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"building LoRAs failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    listed = {entry["name"] for entry in webui.get("/sdapi/v1/loras").json()}
    assert set(LORAS) <= listed, listed
    return LORAS


def generate(ui, prompt: str, script: bool, **payload):
    """(image, infotext) of one 64x64, 4-step image."""
    (image,), data = ui.txt2img(prompt=prompt, **(SCRIPT if script else {}), **payload)
    return image, json.loads(data["info"])["infotexts"][0]


def assert_onediff_ran(infotext: str, what: str, reused: bool = False) -> None:
    outcome = field(infotext, "OneDiff")
    assert outcome is not None and not outcome.startswith(("eager", "not used")), f"{what}: OneDiff: {outcome!r}\n{infotext}"
    if reused:
        assert outcome == "reused", f"{what}: recompiled or not reused: OneDiff: {outcome!r}"


@pytest.mark.parametrize("checkpoint, family", [("tiny-sd15-a", "sd15"), ("tiny-sdxl", "sdxl")])
def test_lora_kinds_match_eager(webui, loras, checkpoint, family):
    """UNet-only, text-encoder-only and UNet+text-encoder LoRA: the script's image equals eager webui's (mean abs uint8
    difference <= 1.0, max <= 8) and clearly differs from the image without LoRA."""
    webui.select_checkpoint(checkpoint)
    plain, info = generate(webui, PROMPT, script=True)
    assert_onediff_ran(info, "no LoRA")
    plain_eager, _ = generate(webui, PROMPT, script=False)
    assert_close(plain, plain_eager, "no LoRA")
    for kind in ("unet", "te", "both"):
        prompt = f"{PROMPT} <lora:odl-{family}-{kind}:1>"
        compiled, info = generate(webui, prompt, script=True)
        assert_onediff_ran(info, kind, reused=True)
        assert "odl-" in (field(info, "Lora hashes") or ""), info
        eager, _ = generate(webui, prompt, script=False)
        assert_close(compiled, eager, f"{checkpoint} {kind} LoRA")
        assert_differs(compiled, plain, f"{checkpoint} {kind} LoRA vs no LoRA")


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_network_kinds_match_eager(sd15, loras, kind):
    """Every network type of webui's builtin Lora extension, fused by webui's own code: the script's image equals eager
    webui's (same tolerance) and differs from the image without it; removing it gives the plain image back bit-exactly,
    all without a recompile. "full" changes biases too (a bias added where there was none: tests/test_lora.py)."""
    plain, _ = generate(sd15, PROMPT, script=True)
    prompt = f"{PROMPT} <lora:odl-sd15-{kind}:1>"
    compiled, info = generate(sd15, prompt, script=True)
    assert_onediff_ran(info, kind, reused=True)
    eager, _ = generate(sd15, prompt, script=False)
    assert_close(compiled, eager, f"{kind} network")
    assert_differs(compiled, plain, f"{kind} network vs none")
    again, _ = generate(sd15, PROMPT, script=True)
    assert np.array_equal(again, plain), f"{kind} not removed exactly: {difference(again, plain)}"


def test_lora_sequence_fuses_in_place_without_recompiling(sd15, loras):
    """A -> B -> B at 0.5 -> A and B at once -> none, all with the script: each image equals eager webui's (same
    tolerance), none recompiles (``OneDiff: reused``), each records ``OneDiff LoRA fuse: N ms``, and after "none" the
    image is bit-identical to the script's image from before any LoRA (original weights restored exactly)."""
    assert sd15.options().get("onediff_lora_backups") == "GPU memory if it has room", "the backups setting is missing"
    before, _ = generate(sd15, PROMPT, script=True)  # compiles here when no earlier test did
    steps = {
        "A": "<lora:odl-sd15-unet:1>",
        "B": "<lora:odl-sd15-both:1>",
        "B at 0.5": "<lora:odl-sd15-both:0.5>",
        "A and B": "<lora:odl-sd15-unet:0.8> <lora:odl-sd15-both:0.5>",
        "none": "",
    }
    images = {}
    for step, tags in steps.items():
        prompt = f"{PROMPT} {tags}" if tags else PROMPT
        compiled, info = generate(sd15, prompt, script=True)
        assert_onediff_ran(info, step, reused=True)
        assert re.fullmatch(r"\d+ ms", field(info, "OneDiff LoRA fuse") or ""), f"{step}: no LoRA fuse time\n{info}"
        eager, _ = generate(sd15, prompt, script=False)
        assert_close(compiled, eager, step)
        images[step] = compiled
    assert np.array_equal(images["none"], before), \
        f"after removing every LoRA the image differs from before any LoRA: {difference(images['none'], before)}"
    for a, b in (("A", "B"), ("B", "B at 0.5"), ("B at 0.5", "A and B"), ("A", "none")):
        assert_differs(images[a], images[b], f"{a} vs {b}")


def test_checkpoint_switch_keeps_lora(sd15, loras):
    """LoRA A on tiny-sd15-a, then tiny-sd15-b with the same LoRA, with the script: the B image equals eager webui's
    B+A image (same tolerance) and is not the A+A image, without a recompile."""
    prompt = f"{PROMPT} <lora:odl-sd15-both:1>"
    on_a, info = generate(sd15, prompt, script=True)
    assert_onediff_ran(info, "checkpoint A")
    sd15.select_checkpoint("tiny-sd15-b")
    try:
        on_b, info = generate(sd15, prompt, script=True)
        assert "Model: tiny-sd15-b" in info, info
        assert_onediff_ran(info, "checkpoint B", reused=True)
        eager_b, _ = generate(sd15, prompt, script=False)
        assert_close(on_b, eager_b, "checkpoint B with LoRA")
        assert_differs(on_b, on_a, "checkpoint B vs A, same LoRA")
    finally:
        sd15.select_checkpoint("tiny-sd15-a")


def test_lora_functional_runs_eagerly_and_says_why(sd15, loras):
    """With the setting 'lora_functional' (webui applies LoRA inside each layer's forward, which a compiled graph does
    not run) a generation with LoRA completes eagerly, equals eager webui's image, and the infotext says why."""
    prompt = f"{PROMPT} <lora:odl-sd15-unet:1>"
    plain, _ = generate(sd15, PROMPT, script=False)
    with sd15.options_set(lora_functional=True):
        image, info = generate(sd15, prompt, script=True)
        eager, _ = generate(sd15, prompt, script=False)
    assert "Lora: use old method" in info and "Settings > Compatibility" in info, info  # where webui 1.10 lists it
    assert field(info, "OneDiff").startswith("eager") and "compile failed" not in field(info, "OneDiff"), info
    assert np.array_equal(image, eager), f"eager fallback differs from eager webui: {difference(image, eager)}"
    assert_differs(image, plain, "LoRA vs no LoRA")
    # The refusal holds for that generation only: with the setting off again the compiled graphs serve.
    _, info = generate(sd15, prompt, script=True)
    assert_onediff_ran(info, "after lora_functional off", reused=True)
