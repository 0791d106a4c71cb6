"""Start a real AUTOMATIC1111 stable-diffusion-webui (v1.10.1) offline, with this extension installed, for tests.

Used by ``conftest.py`` (fixture ``webui``); importable from tests in this folder as ``webui_harness``.
Only needs the standard library plus requests, numpy and PIL (all in webui's venv).

Environment:
  SD_WEBUI_PATH        webui checkout (with repositories/ filled in). Tests are skipped without it.
  SD_WEBUI_PYTHON      python that runs webui (default: $SD_WEBUI_PATH/venv/bin/python, else sys.executable).
  SD_WEBUI_OFFLINE     folder with hf_home/ (HF cache of tokenizers/configs); default: shared/webui-offline found
                       above this repository.
  SD_WEBUI_EXTRA_ARGS  extra webui command-line flags (shell-split).
  SD_WEBUI_START_TIMEOUT  seconds to wait for the API (default 300).
  SD_WEBUI_GPU         set to 1 to run webui on the GPU (without the CPU_FLAGS).
  SD_WEBUI_KEEP        set to 1 to keep the temporary data dir after the session.
Per instance, ``WebUI.extra_env`` (or ``restart(env=...)``) adds variables to webui's environment (None removes one).
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]  # the extension under test: the repository root
EXTENSION_NAME = "onediff_sd_webui"

DEFAULT_FLAGS = [
    "--skip-prepare-environment",  # no git clones / pip installs; also skips extensions' install.py
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--api",
    "--no-download-sd-model",
]
CPU_FLAGS = ["--use-cpu", "all", "--no-half"]  # fp16 does not work on the CPU
"""Left out where ``SD_WEBUI_GPU=1`` (set by bench/device_kit.py on a machine with CUDA): webui then runs on the GPU in
fp16, as users run it."""

# A small, fast, deterministic generation.
DEFAULT_TXT2IMG = {
    "prompt": "a photo of a cat",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler_name": "Euler a",
    "cfg_scale": 7.0,
    "seed": 1234,
    "batch_size": 1,
    "n_iter": 1,
}


def find_webui_path() -> tuple[Path | None, str]:
    """Return (path, '') for a usable webui checkout, or (None, reason)."""
    value = os.environ.get("SD_WEBUI_PATH")
    if not value:
        return None, "SD_WEBUI_PATH is not set (point it at a stable-diffusion-webui v1.10.1 checkout)"
    path = Path(value).expanduser().resolve()
    for rel in ("launch.py", "modules/launch_utils.py", "repositories/stable-diffusion-stability-ai/ldm",
                "repositories/generative-models/sgm", "repositories/k-diffusion/k_diffusion"):
        if not (path / rel).exists():
            return None, f"SD_WEBUI_PATH={value} is not a complete webui checkout (missing {rel})"
    return path, ""


def find_python(webui_path: Path) -> str:
    if os.environ.get("SD_WEBUI_PYTHON"):
        return os.environ["SD_WEBUI_PYTHON"]
    venv_python = webui_path / "venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def find_offline_data() -> tuple[Path | None, str]:
    """The folder holding hf_home/ (tokenizer/config files that webui would otherwise download)."""
    candidates = []
    if os.environ.get("SD_WEBUI_OFFLINE"):
        candidates.append(Path(os.environ["SD_WEBUI_OFFLINE"]))
    for parent in HERE.parents:
        candidates.append(parent / "shared" / "webui-offline")
    for c in candidates:
        if (c / "hf_home" / "hub").is_dir():
            return c, ""
    return None, "no webui-offline data (hf_home/) found: set SD_WEBUI_OFFLINE or provide shared/webui-offline"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MEAN_LIMIT, MAX_LIMIT = 1.0, 8
"""Compiled and eager images of one request count as equal when the mean absolute difference of their uint8 pixels is
at most MEAN_LIMIT and the largest at most MAX_LIMIT: Inductor reorders float additions, which can move a pixel near a
rounding boundary by a step; wrong or stale weights, or a missing LoRA, move the mean by tens."""
CLEARLY_DIFFERENT = 3.0
"""Mean absolute uint8 difference above which two images are not the same image."""


def difference(a, b) -> tuple[float, int]:
    """(mean, largest) absolute difference of two uint8 images."""
    import numpy as np

    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


def assert_close(image, reference, what: str) -> None:
    mean, largest = difference(image, reference)
    assert mean <= MEAN_LIMIT and largest <= MAX_LIMIT, (
        f"{what}: compiled vs eager mean |diff| {mean:.3f} (limit {MEAN_LIMIT}), max {largest} (limit {MAX_LIMIT})"
    )


def assert_differs(a, b, what: str) -> None:
    mean, _ = difference(a, b)
    assert mean > CLEARLY_DIFFERENT, f"{what}: mean difference only {mean:.3f} (want > {CLEARLY_DIFFERENT})"


def decode_image(b64: str):
    """base64 PNG (as in webui API responses) -> numpy uint8 array (H, W, C)."""
    import numpy as np
    from PIL import Image

    if "," in b64[:64] and b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def encode_image(array_or_image) -> str:
    """numpy array or PIL image -> base64 PNG, for img2img's init_images."""
    import numpy as np
    from PIL import Image

    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(np.asarray(array_or_image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def txt2img(base_url: str, timeout: float = 300, **payload):
    """POST /sdapi/v1/txt2img with DEFAULT_TXT2IMG updated by payload.

    Returns (images, response_json) where images is a list of numpy uint8 arrays.
    """
    import requests

    body = dict(DEFAULT_TXT2IMG)
    body.update(payload)
    r = requests.post(f"{base_url}/sdapi/v1/txt2img", json=body, timeout=timeout)
    if r.status_code != 200:
        raise AssertionError(f"txt2img failed: HTTP {r.status_code}: {r.text[:2000]}")
    data = r.json()
    return [decode_image(b) for b in data["images"]], data


class WebUI:
    """A webui process on 127.0.0.1 with its own --data-dir.

    Attributes: webui_path, python, data_dir, log_path, port, base_url, process, checkpoints (name -> Path),
    loras (name -> Path), extra_args.
    """

    def __init__(self, webui_path: Path, data_dir: Path, python: str | None = None, hf_home: Path | None = None,
                 extra_args: list[str] | None = None, start_timeout: float | None = None,
                 extra_env: dict[str, str | None] | None = None):
        self.webui_path = Path(webui_path)
        self.data_dir = Path(data_dir)
        self.python = python or find_python(self.webui_path)
        self.hf_home = hf_home
        self.extra_args = list(extra_args or []) + shlex.split(os.environ.get("SD_WEBUI_EXTRA_ARGS", ""))
        self.start_timeout = start_timeout or float(os.environ.get("SD_WEBUI_START_TIMEOUT", "300"))
        self.extra_env: dict[str, str | None] = dict(extra_env or {})
        self.log_path = self.data_dir / "webui.log"
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.checkpoints: dict[str, Path] = {}
        self.loras: dict[str, Path] = {}
        self.start_count = 0
        self.last_start_seconds: float | None = None

    # ----- setup -------------------------------------------------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ)
        for k in ("COMMANDLINE_ARGS", "PYTHONPATH"):
            env.pop(k, None)
        env.update({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "SD_WEBUI_PATH": str(self.webui_path),
        })
        if self.hf_home:
            env["HF_HOME"] = str(self.hf_home)
        for k, v in self.extra_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def build_models(self):
        """Build the tiny checkpoints and LoRAs (tests/webui/checkpoints.py) into data_dir/models/, with webui's python."""
        ckpt_dir = self.data_dir / "models" / "Stable-diffusion"
        lora_dir = self.data_dir / "models" / "Lora"
        cmd = [self.python, str(HERE / "checkpoints.py"), str(ckpt_dir), "--webui", str(self.webui_path),
               "--lora-dir", str(lora_dir)]
        r = subprocess.run(cmd, env=self.env(), cwd=str(self.data_dir), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"building tiny checkpoints failed:\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}")
        self.checkpoints = {p.stem: p for p in sorted(ckpt_dir.glob("*.safetensors"))}
        self.loras = {p.stem: p for p in sorted(lora_dir.glob("*.safetensors"))}

    def add_controlnet(self) -> None:
        """Link sd-webui-controlnet ($SD_WEBUI_CONTROLNET) and the test extension that points its model guesser at the
        tiny widths; build ``tiny-sd15-cn`` and ``tiny-sdxl-cn`` (SD1.5's and SDXL's topologies, narrow) and the tiny
        ControlNet models for them. Before ``start()``."""
        controlnet = os.environ.get("SD_WEBUI_CONTROLNET")
        if not controlnet or not (Path(controlnet) / "scripts" / "hook.py").is_file():
            raise RuntimeError("SD_WEBUI_CONTROLNET does not name an sd-webui-controlnet checkout "
                               "(eval \"$(python3 tools/make_webui.py)\" sets it)")
        from checkpoints import CONTROLNET_CHECKPOINTS  # this folder is on sys.path (conftest.py)

        ckpt_dir = self.data_dir / "models" / "Stable-diffusion"
        cmd = [self.python, str(HERE / "checkpoints.py"), str(ckpt_dir), "--webui", str(self.webui_path),
               "--controlnet-checkpoints", "--controlnet", controlnet,
               "--controlnet-dir", str(self.data_dir / "models" / "ControlNet")]
        r = subprocess.run(cmd, env=self.env(), cwd=str(self.data_dir), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"building the ControlNet test models failed:\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}")
        self.checkpoints.update({name: ckpt_dir / f"{name}.safetensors" for name in CONTROLNET_CHECKPOINTS})
        self.install_extension(Path(controlnet), name="sd-webui-controlnet")
        self.install_extension(HERE / "extensions" / "tiny_controlnet_config", name="tiny_controlnet_config")

    def install_extension(self, source: Path = REPO_ROOT, name: str = EXTENSION_NAME) -> Path:
        ext_dir = self.data_dir / "extensions"
        ext_dir.mkdir(parents=True, exist_ok=True)
        link = ext_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(source).resolve(), target_is_directory=True)
        return link

    # ----- process -----------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def command(self) -> list[str]:
        device_flags = [] if os.environ.get("SD_WEBUI_GPU") == "1" else CPU_FLAGS
        return [self.python, "launch.py", *DEFAULT_FLAGS, *device_flags, "--port", str(self.port),
                "--data-dir", str(self.data_dir), *self.extra_args]

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self):
        if self.is_running():
            return
        self.port = free_port()
        self.start_count += 1
        t0 = time.monotonic()
        with open(self.log_path, "a", encoding="utf8") as log:
            log.write(f"\n===== start #{self.start_count}: {shlex.join(self.command())}\n")
            log.flush()
            self._log_offset_at_start = log.tell()
            self.process = subprocess.Popen(self.command(), cwd=str(self.webui_path), env=self.env(),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        try:
            self.wait_ready(self.start_timeout)
        except Exception:
            self.stop()
            raise
        self.last_start_seconds = time.monotonic() - t0

    def wait_ready(self, timeout: float):
        """Wait until the API answers and the startup model load has finished."""
        import requests

        deadline = time.monotonic() + timeout
        last_err = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(f"webui exited with code {self.process.returncode} during startup\n"
                                   f"----- log ({self.log_path}):\n{self.log_tail()}")
            if "Startup time:" not in self.log_text(since_start=True):
                # webui adds its API middleware after gradio starts serving; a request in between makes starlette
                # build its middleware stack, and webui's startup then fails ("Cannot add middleware ...").
                time.sleep(0.5)
                continue
            try:
                r = requests.get(self.url("/sdapi/v1/options"), timeout=10)
                if r.status_code == 200:
                    # /sdapi/v1/options answers as soon as the API is mounted; the startup checkpoint loads in a
                    # thread; sd_model_checkpoint in the log tells us it is done (or a load failure).
                    log = self.log_text(since_start=True)
                    if "Model loaded in" in log:
                        return
                    if "Stable diffusion model failed to load" in log:
                        raise RuntimeError(f"webui failed to load the startup model\n{self.log_tail()}")
                last_err = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last_err = repr(e)
            time.sleep(0.5)
        raise TimeoutError(f"webui API not ready after {timeout:.0f}s ({last_err})\n"
                           f"----- log ({self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout: float = 30):
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout)
        self.process = None

    def restart(self, extra_args: list[str] | None = None, env: dict[str, str | None] | None = None):
        """Stop and start again with the same data dir (new port: re-read base_url). extra_args replaces the extra flags,
        env replaces ``extra_env`` (e.g. ``{"TORCHINDUCTOR_CACHE_DIR": fresh_dir}``)."""
        self.stop()
        if extra_args is not None:
            self.extra_args = list(extra_args)
        if env is not None:
            self.extra_env = dict(env)
        self.start()

    # ----- logs --------------------------------------------------------------------------------------------------
    def log_text(self, since_start: bool = False) -> str:
        try:
            with open(self.log_path, encoding="utf8", errors="replace") as f:
                if since_start:
                    f.seek(getattr(self, "_log_offset_at_start", 0))
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 20000) -> str:
        return self.log_text()[-chars:]

    # ----- API helpers -------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60, **kw):
        import requests
        return requests.get(self.url(path), timeout=timeout, **kw)

    def post(self, path: str, json=None, timeout: float = 300, **kw):
        import requests
        return requests.post(self.url(path), json=json, timeout=timeout, **kw)

    def options(self) -> dict:
        r = self.get("/sdapi/v1/options")
        r.raise_for_status()
        return r.json()

    def set_options(self, **options):
        r = self.post("/sdapi/v1/options", json=options)
        if r.status_code != 200:
            raise AssertionError(f"setting options {options} failed: HTTP {r.status_code}: {r.text[:2000]}")

    @contextlib.contextmanager
    def options_set(self, **options):
        """``options`` set for the ``with`` block, then the values they had put back."""
        before = self.options()
        self.set_options(**options)
        try:
            yield
        finally:
            self.set_options(**{name: before[name] for name in options})

    def select_checkpoint(self, name: str) -> str:
        """Load checkpoint ``name`` (file stem, e.g. 'tiny-sd15-b') via /sdapi/v1/options; returns the loaded title."""
        self.set_options(sd_model_checkpoint=name)
        title = self.options()["sd_model_checkpoint"]
        if not title.startswith(name):
            raise AssertionError(f"selected {name!r} but webui reports {title!r}")
        return title

    def current_checkpoint(self) -> str:
        return self.options()["sd_model_checkpoint"]

    def txt2img(self, **payload):
        """(images as numpy arrays, response json); payload overrides DEFAULT_TXT2IMG."""
        return txt2img(self.base_url, **payload)

    def img2img(self, init_image, **payload):
        body = {k: v for k, v in DEFAULT_TXT2IMG.items()}
        body.update({"init_images": [encode_image(init_image)], "denoising_strength": 0.5})
        body.update(payload)
        r = self.post("/sdapi/v1/img2img", json=body)
        if r.status_code != 200:
            raise AssertionError(f"img2img failed: HTTP {r.status_code}: {r.text[:2000]}")
        data = r.json()
        return [decode_image(b) for b in data["images"]], data

    def scripts(self) -> dict:
        """/sdapi/v1/scripts: {'txt2img': [titles lowercased], 'img2img': [...]}, extension scripts included."""
        r = self.get("/sdapi/v1/scripts")
        r.raise_for_status()
        return r.json()


def make_webui(base_dir: Path, install_extension: bool = True, extra_args: list[str] | None = None,
               extra_env: dict[str, str | None] | None = None) -> WebUI:
    """Prepare a data dir under base_dir (models, config.json, HF cache copy, extension link) and return a WebUI
    (not started). Raises RuntimeError with a reason when webui or the offline data are missing."""
    webui_path, reason = find_webui_path()
    if webui_path is None:
        raise RuntimeError(reason)
    offline, reason = find_offline_data()
    if offline is None:
        raise RuntimeError(reason)
    base_dir = Path(base_dir)
    data_dir = base_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    hf_home = base_dir / "hf_home"
    if not hf_home.exists():
        shutil.copytree(offline / "hf_home", hf_home)
        for root, dirs, files in os.walk(hf_home):  # shared/ is read-only; HF wants to write into its cache
            for n in dirs + files:
                p = os.path.join(root, n)
                os.chmod(p, os.stat(p).st_mode | 0o200)
        os.chmod(hf_home, os.stat(hf_home).st_mode | 0o200)
    config = data_dir / "config.json"
    if not config.exists():
        src = HERE / "webui-config.json"
        if not src.exists():
            src = offline / "webui-config.json"
        shutil.copyfile(src, config)
    ui = WebUI(webui_path, data_dir, hf_home=hf_home, extra_args=extra_args, extra_env=extra_env)
    ui.build_models()
    (data_dir / "extensions").mkdir(exist_ok=True)
    if install_extension:
        ui.install_extension()
    return ui
