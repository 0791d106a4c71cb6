"""pytest harness: a real stable-diffusion-webui v1.10.1 started offline with this extension installed.

Fixture ``webui`` (session scope) -> webui_harness.WebUI, started, with:
  base_url, data_dir, log_path, checkpoints {name: path}, loras {name: path},
  restart(extra_args=None, env=None), extra_env, stop(), start(), select_checkpoint(name),
  txt2img(**payload) -> (images, json), img2img(init_image, **payload), options(), set_options(**opts), options_set(**opts) (a with block), scripts(), get(path), post(path, json), log_text().

Everything here is skipped when SD_WEBUI_PATH is unset or is not a webui checkout, unless ONEDIFF_REQUIRE_WEBUI is set
(tests/run.sh sets it): then the run fails with the reason.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_harness  # noqa: E402

_WEBUI_PATH, _SKIP_REASON = webui_harness.find_webui_path()
if _WEBUI_PATH is not None:
    _offline, _reason = webui_harness.find_offline_data()
    if _offline is None:
        _SKIP_REASON = _reason

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if not _SKIP_REASON:
        return
    webui_items = [item for item in items if _HERE in Path(str(item.fspath)).resolve().parents]
    if webui_items and os.environ.get("ONEDIFF_REQUIRE_WEBUI"):  # set by tests/run.sh, which makes a webui if needed
        raise pytest.UsageError(f"webui tests cannot run: {_SKIP_REASON}")
    marker = pytest.mark.skip(reason=f"webui tests skipped: {_SKIP_REASON}")
    for item in webui_items:
        item.add_marker(marker)


@pytest.fixture(scope="session")
def webui_factory():
    """Make extra, independent webui instances: ``ui = webui_factory(install_extension=False)``; started for you,
    stopped at the end of the session; ``extensions={name: folder}`` links test extensions in before the start. Each gets its own empty TORCHINDUCTOR_CACHE_DIR (``extra_env`` may override):
    Inductor's on-disk cache would otherwise carry compiled code over from earlier sessions and make compiles fast."""
    if _SKIP_REASON:
        pytest.skip(_SKIP_REASON)
    made = []

    def factory(install_extension: bool = True, extra_args=None, start: bool = True, extra_env=None, extensions=None):
        base = Path(tempfile.mkdtemp(prefix="sd-webui-test-"))
        env = {"TORCHINDUCTOR_CACHE_DIR": str(base / "inductor-cache"), **(extra_env or {})}
        ui = webui_harness.make_webui(base, install_extension=install_extension, extra_args=extra_args, extra_env=env)
        ui._base_dir = base
        made.append(ui)
        for name, folder in (extensions or {}).items():
            ui.install_extension(folder, name=name)
        if start:
            ui.start()
        return ui

    yield factory
    for ui in made:
        ui.stop()
        if not os.environ.get("SD_WEBUI_KEEP"):
            shutil.rmtree(ui._base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def webui(webui_factory):
    """The shared webui instance (extension under test linked into <data_dir>/extensions/onediff_sd_webui)."""
    ui = webui_factory(install_extension=True)
    print(f"\nwebui up at {ui.base_url} in {ui.last_start_seconds:.1f}s; data dir {ui.data_dir}; log {ui.log_path}")
    yield ui


@pytest.fixture
def sd15(webui):
    """webui with tiny-sd15-a selected."""
    webui.select_checkpoint("tiny-sd15-a")
    return webui


@pytest.fixture
def sdxl(webui):
    """webui with tiny-sdxl selected."""
    webui.select_checkpoint("tiny-sdxl")
    return webui


def pytest_runtest_makereport(item, call):
    # print the webui log tail for failing tests that use the fixture
    if call.when == "call" and call.excinfo is not None and "webui" in getattr(item, "fixturenames", ()):
        ui = item.funcargs.get("webui")
        if ui is not None:
            item.add_report_section("call", "webui log (tail)", ui.log_tail(8000))
