"""Other extensions' hooks on the UNet, in a real webui v1.10.1 on the CPU: never a wrong image, never a lost hook.

Webui's builtin Hypertile runs as it is; the hooks of IP-Adapter / Regional Prompter (instance forwards on ``attn2``),
Self-attention guidance (an instance forward on a middle-block ``attn1`` feeding a ``cfg_denoised`` callback) and FreeU
(webui's ``th.cat`` patched with a step-dependent factor) are reproduced by the test extension ``hook_standins/``, and
so are two hooks outside the UNet: Dynamic Thresholding's (the sampler's CFG combination replaced) and ADetailer's (a
nested img2img inpainting pass in ``postprocess_image``), which run compiled, without compiling again.

Each test compares the script's image with eager webui's with the same hook (the harness's threshold), checks that
the hook changed the image at all (``assert_differs``: a hook that does nothing passes every equality; for Hypertile,
whose effect on the tiny model is smaller, ``assert_hypertile``), and that the hook is still in place afterwards. These hooks stay on the model (Hypertile's for good), so the tests run in their own
webui, with the stand-in extension installed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sd_webui_onediff.bench.webui_bench import infotext_field as field  # noqa: E402
from test_onediff_script import infotext, plain, scripted  # noqa: E402
from webui_harness import assert_close, assert_differs, difference  # noqa: E402

STANDINS = Path(__file__).resolve().parent / "hook_standins"
HYPERTILE = {"hypertile_enable_unet": True, "hypertile_max_tile_unet": 128, "hypertile_swap_size_unet": 1}
HYPERTILE_SIZE = {"width": 256, "height": 256}
"""Hypertile tiles attention where the latent is at least twice its smallest tile (16 latent pixels)."""


@pytest.fixture(scope="module")
def ui(webui_factory):
    ui = webui_factory(extensions={"hook_standins": STANDINS})
    ui.select_checkpoint("tiny-sd15-a")
    return ui


def standin(kind: str) -> dict:
    return {"alwayson_scripts": {"hook stand-ins": {"args": [kind]}}}


def assert_nothing_lost(ui) -> None:
    response = ui.get("/hook-standins/lost")
    response.raise_for_status()
    assert response.json() == [], "a stand-in's hook was removed or replaced during a generation"


def assert_eager_naming(text: str, *parts: str) -> None:
    value = field(text) or ""
    assert value.startswith("eager, ") and all(part in value for part in parts), text
    assert "most compiled graphs" not in value, text


@pytest.mark.parametrize("kind, where", [
    ("attn2", "an instance forward on input_blocks.1.1.transformer_blocks.0.attn2"),
    ("sag", "an instance forward on middle_block.1.transformer_blocks.0.attn1"),
])
def test_instance_forwards_run_eagerly_named_and_kept(ui, kind, where):
    without = plain(ui)
    hooked = plain(ui, **standin(kind))
    assert_differs(hooked, without, f"{kind} stand-in")
    image, text = scripted(ui, **standin(kind))
    assert_close(image, hooked, f"script with the {kind} stand-in vs eager")
    assert_eager_naming(text, where, "scripts/hook_standins.py")
    assert_nothing_lost(ui)
    assert_close(plain(ui, **standin(kind)), hooked, f"eager {kind} after the script")


def test_a_patched_function_is_traced_when_inactive_and_refused_when_it_changes_every_step(ui):
    """The patched ``th.cat`` is traced with the UNet; active, it changes every step: the first step compiles again (a
    setting may change between generations), the next one's recompile is refused before tracing and named, instead of
    compiling each step until the graph limit."""
    image, text = scripted(ui)
    assert field(text) == "reused" or field(text).startswith("compiled"), text
    assert_close(image, plain(ui), "script with the inactive patch vs eager")

    stepped = plain(ui, **standin("freeu"))
    assert_differs(stepped, plain(ui), "freeu stand-in")
    image, text = scripted(ui, **standin("freeu"))
    assert_close(image, stepped, "script with the freeu stand-in vs eager")
    assert_eager_naming(text, "reads changed between calls", "read by stepped_cat in hook_standins/lib_hook_standins.py")


def assert_reused_and_equal(ui, kind: str) -> None:
    """The stand-in hooks outside the UNet: the script's image equals eager webui's with it, from the graph compiled
    for this size without it (no recompile: ``reused``). Runs before Hypertile's test, whose wrappers stay."""
    image, text = scripted(ui)
    assert field(text) == "reused" or field(text).startswith("compiled"), text
    without = plain(ui)
    assert_close(image, without, "script without a stand-in vs eager")
    hooked = plain(ui, **standin(kind))
    assert_differs(hooked, without, f"{kind} stand-in")
    image, text = scripted(ui, **standin(kind))
    assert field(text) == "reused", f"{kind} stand-in made the UNet compile again: {text}"
    assert_close(image, hooked, f"script with the {kind} stand-in vs eager")


def test_a_replaced_cfg_combination_runs_compiled(ui):
    """Dynamic Thresholding swaps the sampler for one whose CFG denoiser has its own ``combine_denoised``."""
    assert_reused_and_equal(ui, "dynthres")


def test_a_nested_inpainting_pass_in_postprocess_image_runs_compiled(ui):
    """ADetailer's img2img inpainting pass runs inside the scripted generation (its ``postprocess_image``) through the
    compiled UNet: at the same size (its crop is resized to the image's size), the same graph."""
    assert_reused_and_equal(ui, "adetailer")
    response = ui.get("/hook-standins/inner-pass-unets")
    response.raise_for_status()
    assert response.json()[-2:] == ["UNetModel", "CompiledUNet"], "the eager run's inner pass, then the script's"


def test_a_nested_pass_at_another_size_compiles_once_for_it(ui):
    """ADetailer's separate inpaint size: the inner pass is a new shape, compiled once within the generation (the
    infotext says so), then reused; the image equals eager's."""
    kind = "adetailer 96"
    hooked = plain(ui, **standin(kind))
    for expected in ("compiled in", "reused"):
        image, text = scripted(ui, **standin(kind))
        assert field(text).startswith(expected), f"{expected!r} expected: {text}"
        assert_close(image, hooked, f"script with the {kind} stand-in vs eager")


def assert_hypertile(image, tiled, untiled, what: str) -> None:
    """Hypertile tiles one attention layer of the tiny model: it moves the image by a fraction of a pixel value on
    average, below the harness's threshold for 'different', but the images it makes are exact up to float rounding
    (weights re-laid for the compiled graph): ``image`` must be much nearer ``tiled`` than ``untiled`` is."""
    assert_close(image, tiled, what)
    near, effect = difference(image, tiled)[0], difference(untiled, tiled)[0]
    assert effect > 0.1 and near < effect / 5, f"{what}: {near:.3f} from Hypertile's image, which is {effect:.3f} from none"


def test_hypertile_runs_eagerly_and_stays_active(ui):
    """Hypertile's wrappers stay on the model once installed; the script used to delete them for good."""
    with ui.options_set(**HYPERTILE):
        tiled = plain(ui, **HYPERTILE_SIZE)
        ui.set_options(hypertile_enable_unet=False)
        untiled = plain(ui, **HYPERTILE_SIZE)
        ui.set_options(hypertile_enable_unet=True)
        image, text = scripted(ui, **HYPERTILE_SIZE)
        assert_hypertile(image, tiled, untiled, "script with Hypertile vs eager")
        assert_eager_naming(text, "an instance forward on input_blocks.1.1.transformer_blocks.0.attn1",
                            "hypertile/hypertile.py")
        assert_hypertile(plain(ui, **HYPERTILE_SIZE), tiled, untiled, "eager Hypertile after the script")
