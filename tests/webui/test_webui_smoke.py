"""Smoke tests of the webui harness itself: webui runs offline, the tiny checkpoints generate, Lora works."""
import pytest

np = pytest.importorskip("numpy")

from webui_harness import EXTENSION_NAME

SD15 = ["tiny-sd15-a", "tiny-sd15-b"]
ALL = SD15 + ["tiny-sdxl"]


def test_webui_up_and_lists_tiny_checkpoints(webui):
    r = webui.get("/sdapi/v1/sd-models")
    assert r.status_code == 200
    names = {m["model_name"] for m in r.json()}
    assert set(ALL) <= names, names
    assert (webui.data_dir / "extensions" / EXTENSION_NAME).is_symlink()


def test_txt2img_each_checkpoint_deterministic(webui):
    images = {}
    for name in ALL:
        webui.select_checkpoint(name)
        (img,), info = webui.txt2img(seed=4321)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 1, f"{name}: flat image"
        (again,), _ = webui.txt2img(seed=4321)
        assert np.array_equal(img, again), f"{name}: same seed gave different images"
        (other_prompt,), _ = webui.txt2img(seed=4321, prompt="a red car in the rain")
        assert not np.array_equal(img, other_prompt), f"{name}: prompt does not change the image"
        assert f"Model: {name}" in info["info"]
        images[name] = img
    assert not np.array_equal(images["tiny-sd15-a"], images["tiny-sd15-b"]), "checkpoints A and B gave the same image"


def test_sdxl_is_recognised_as_sdxl(webui):
    webui.select_checkpoint("tiny-sdxl")
    (img,), _ = webui.txt2img(width=128, height=64)
    assert img.shape == (64, 128, 3)
    log = webui.log_text()
    assert "tiny-sdxl.yaml" in log


def test_builtin_lora_extension(webui):
    """The builtin Lora extension is loaded: its API lists our tiny LoRAs, and <lora:...> changes the image and is
    recorded in the infotext."""
    r = webui.post("/sdapi/v1/refresh-loras")
    assert r.status_code == 200
    loras = {entry["name"] for entry in webui.get("/sdapi/v1/loras").json()}
    assert {"tiny-lora-sd15", "tiny-lora-sdxl"} <= loras
    for ckpt, lora in (("tiny-sd15-a", "tiny-lora-sd15"), ("tiny-sdxl", "tiny-lora-sdxl")):
        webui.select_checkpoint(ckpt)
        (plain,), _ = webui.txt2img(prompt="a cat")
        (with_lora,), info = webui.txt2img(prompt=f"a cat <lora:{lora}:1>")
        assert "Lora hashes" in info["info"] and lora in info["info"]
        assert np.abs(plain.astype(int) - with_lora).mean() > 1, f"{lora} did not change the image"
        (plain_again,), _ = webui.txt2img(prompt="a cat")
        assert np.array_equal(plain, plain_again), "LoRA weights leaked into the next generation"


def test_scripts_endpoint_lists_builtin_extension_scripts(webui):
    scripts = webui.scripts()
    # 'hypertile' comes from extensions-builtin/hypertile: extension scripts are listed (titles lower-cased)
    assert "hypertile" in [s.lower() for s in scripts["txt2img"]]


def test_restart_keeps_data_dir(webui):
    old_url = webui.base_url
    webui.select_checkpoint("tiny-sd15-b")
    webui.restart()
    assert webui.get("/sdapi/v1/sd-models").status_code == 200
    # the selected checkpoint is saved in <data_dir>/config.json and reloaded on start
    assert webui.current_checkpoint().startswith("tiny-sd15-b")
    assert webui.base_url != old_url or webui.is_running()
