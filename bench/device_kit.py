#!/usr/bin/env python3
"""Run this extension inside a real webui v1.10.1 on a GPU machine that has no network (the lent H200: Python 3.12,
torch 2.11, transformers 5, numpy 2, but no gradio and no webui).

Here, with ``shared/`` beside the checkout and PyPI reachable::

    python3 bench/device_kit.py            # builds .kit/ (git-ignored, about 40 MiB)

There, from the repository root, with ``.kit`` carried along::

    python3 bench/device_kit.py run [--controlnet] -- 'CMD' ['CMD' ...]

``.kit/`` holds a copy of webui v1.10.1 and its repositories without tests, images and docs, sd-webui-controlnet
v1.1.455 without its sample data, the offline Hugging Face files (``hf_home``) and cp312 wheels of what webui needs
beyond the GPU image's packages. ``run`` installs the wheels into ``/tmp/kit-work/site``, lays out a writable webui
there, makes ``/tmp/kit-work/python`` (the image's python with the wheels in front of its own packages) and exports
what ``tests/webui/webui_harness.py`` reads (``SD_WEBUI_PATH``, ``SD_WEBUI_PYTHON``, ``SD_WEBUI_OFFLINE``,
``SD_WEBUI_GPU``, ``SD_WEBUI_CONTROLNET`` with ``--controlnet``) and ``SD_WEBUI_MODEL_CACHE`` (bench/webui_start.py
builds full-size checkpoints there once: a later call on the same warm machine reuses them), then runs each CMD with
``bash -c``; it exits with the first failing CMD's status.

Which packages travel, and why the image's others are kept: see ``WHEELS``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KIT = REPO_ROOT / ".kit"
WORK = Path("/tmp/kit-work")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

WHEELS = (
    # webui's pins (requirements_versions.txt) that the image lacks (pillow-avif-plugin: a newer, smaller build)
    "GitPython==3.1.32", "gitdb==4.0.12", "smmap==5.0.3", "blendmodes==2022", "aenum==3.1.17", "deprecation==2.1.0",
    "diskcache==5.6.3", "inflection==0.5.1", "kornia==0.6.7", "lark==1.1.2", "omegaconf==2.2.3",
    "open-clip-torch==2.20.0", "ftfy==6.3.1", "wcwidth==0.9.4", "piexif==1.1.3", "resize-right==0.0.2",
    "spandrel==0.3.4", "spandrel-extra-arches==0.1.1", "tomesd==0.1.3", "torchsde==0.2.6", "trampoline==0.1.2",
    "pillow-avif-plugin==1.6.0", "facexlib==0.3.0", "filterpy==2.0.0",
    "clean-fid==0.1.35", "clip-anytorch==2.6.0",  # k-diffusion imports both (the latter: openai CLIP from PyPI)
    "controlnet-aux==0.0.10", "importlib-metadata==8.7.0",  # sd-webui-controlnet's main script imports the first
    "pytz==2026.6",  # webui imports it; the image has pandas without it
    "pytorch-lightning==1.9.4",  # the image's 2.x lacks utilities.distributed, which ldm imports before webui aliases it
    # the UI and API stack: gradio 3.41.2 with fastapi 0.94 / starlette 0.26 / pydantic 1 (ControlNet wants <= 1.10.17)
    "gradio==3.41.2", "gradio-client==0.5.0", "fastapi==0.94.0", "starlette==0.26.1", "pydantic==1.10.17",
    "uvicorn==0.54.0", "python-multipart==0.0.34", "orjson==3.13.0", "websockets==11.0.3", "ffmpy==1.0.0",
    "pydub==0.25.1", "semantic-version==2.10.0", "importlib-resources==6.5.2", "altair==5.5.0", "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
    # in the image at versions webui's stack refuses: webui's httpx/httpcore pins need h11 < 0.13 and anyio 3
    "httpx==0.24.1", "httpcore==0.15.0", "h11==0.12.0", "anyio==3.7.1", "sniffio==1.3.1",
    # transformers 4.30.2 (webui's pin; webui patches its loading internals) wants huggingface-hub < 1.0; its
    # tokenizers < 0.14 has no cp312 wheel: see RELAXED_PINS
    "transformers==4.30.2", "huggingface-hub==0.36.2",
)
"""cp312 wheels installed in front of the image's packages. Kept from the image although webui pins others, because
webui runs with them (shown by the smoke run in README's bench section) and compiled packages of the image are built
against them: numpy 2, pillow, scipy, scikit-image, pandas, opencv-python-headless, numba, protobuf, markupsafe,
aiofiles, accelerate, safetensors, einops, lightning-utilities, torchmetrics, timm, torchdiffeq, psutil."""
SDIST_ONLY = ("jsonmerge==1.8.0", "antlr4-python3-runtime==4.9.3")
"""Pure-Python packages PyPI has only as source: built into wheels here."""
RELAXED_PINS = {"transformers/dependency_versions_table.py": ('"tokenizers>=0.11.1,!=0.11.3,<0.14"',
                                                            '"tokenizers>=0.11.1,!=0.11.3"')}
"""transformers 4.30.2 checks at import that tokenizers < 0.14, which has no cp312 wheel; with the image's tokenizers
(0.23) everything webui uses works (its slow CLIP tokenizer, tokenizers' AddedToken; without tokenizers, 4.30.2's
stand-in AddedToken gives the CLIP tokenizer wrong token ids). So the installed copy's check is relaxed."""
WHEEL_LEFT_OUT = {"gradio": ("gradio/templates/cdn/", "gradio/test_data/")}
"""Parts of wheels a local webui never reads (gradio's copy of its frontend for CDN hosting, its test files): 10 MiB
of the kit's size limit."""

WEBUI_LEFT_OUT = {".github", "test", "tests", "screenshot.png", "CHANGELOG.md", "notebooks", "docs", "webui.bat",
                  "webui-user.bat", "environment-wsl2.yaml", "requirements_npu.txt"}
CONTROLNET_LEFT_OUT = {"unit_tests", "tests", "samples", "example", "README.md"}
LEFT_OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".ipynb", ".mp4", ".data", ".gz")
"""Sample images, notebooks, the IP-Adapter and OneFormer data files (weights are downloaded on use, which offline
cannot happen anyway); html/ keeps its images, webui's UI reads them."""


def shared_dir() -> Path:
    for parent in REPO_ROOT.parents:
        if (parent / "shared" / "webui-v1.10.1" / "launch.py").exists():
            return parent / "shared"
    raise SystemExit("no shared/webui-v1.10.1 found above the checkout: the kit is built from it")


def left_out(names: set[str], keep_images: bool):
    def ignore(folder: str, entries: list[str]) -> list[str]:
        images_allowed = keep_images and ("/html" in folder or "/javascript" in folder)
        return [e for e in entries if e in names or e == "__pycache__"
                or (e.endswith(LEFT_OUT_SUFFIXES) and not images_allowed)]
    return ignore


def pip_download(requirements, target: Path) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target),
                    *requirements], check=True)


def build() -> None:
    shared = shared_dir()
    partial = KIT.with_name(".kit.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(shared / "webui-v1.10.1", partial / "webui", ignore=left_out(WEBUI_LEFT_OUT, True))
    shutil.copytree(shared / "sd-webui-controlnet-v1.1.455", partial / "sd-webui-controlnet",
                    ignore=left_out(CONTROLNET_LEFT_OUT, False))
    shutil.copytree(shared / "webui-offline" / "hf_home", partial / "offline" / "hf_home")
    shutil.copyfile(shared / "webui-offline" / "webui-config.json", partial / "offline" / "webui-config.json")
    wheels = partial / "wheels"
    pip_download(WHEELS, wheels)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), *SDIST_ONLY],
                   check=True)
    for name, prefixes in WHEEL_LEFT_OUT.items():
        for wheel in wheels.glob(f"{name}-*.whl"):
            trim_wheel(wheel, prefixes)
    for root, dirs, files in os.walk(partial):  # shared/ is read-only; the kit is replaced on the next build
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    shutil.rmtree(KIT, ignore_errors=True)
    partial.rename(KIT)
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT}: {size / 2 ** 20:.1f} MiB ({len(list(KIT.glob('wheels/*.whl')))} wheels); carry it as \".kit\"")


def trim_wheel(wheel: Path, prefixes: tuple[str, ...]) -> None:
    """Rewrites ``wheel`` without the files under ``prefixes`` (and their RECORD lines)."""
    trimmed = wheel.with_suffix(".trimmed")
    encoded = tuple(prefix.encode() for prefix in prefixes)
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename.startswith(prefixes):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(encoded))
            target.writestr(item, data)
    trimmed.replace(wheel)


def copy_writable(source: Path, target: Path) -> None:
    if not target.exists():
        shutil.copytree(source, target, symlinks=True)


def cuda_visible(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True)
    return probe.stdout.strip() == "True"


def lay_out(work: Path, controlnet: bool) -> dict[str, str]:
    """The webui, the wheels and the python wrapper under ``work``; returns the environment for the commands."""
    if not (KIT / "wheels").is_dir():
        raise SystemExit(f"{KIT} not found: build it with `python3 bench/device_kit.py` and carry '.kit'")
    site = work / "site"
    if not (site / ".installed").exists():
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
                        *map(str, sorted((KIT / "wheels").glob("*.whl")))], check=True)
        for path, (pin, relaxed) in RELAXED_PINS.items():
            text = (site / path).read_text()
            if pin not in text:
                raise SystemExit(f"{site / path} has no {pin}: the kit's wheels changed; update RELAXED_PINS")
            (site / path).write_text(text.replace(pin, relaxed))
        (site / ".installed").write_text("")
    copy_writable(KIT / "webui", work / "webui")
    copy_writable(KIT / "offline", work / "offline")
    python = work / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "SD_WEBUI_PATH": str(work / "webui"), "SD_WEBUI_PYTHON": str(python),
           "SD_WEBUI_OFFLINE": str(work / "offline"), "SD_WEBUI_MODEL_CACHE": str(work / "models"),
           "ONEDIFF_REQUIRE_WEBUI": "1",
           "HF_HOME": str(work / "offline" / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}
    env.pop("SD_WEBUI_CONTROLNET", None)
    if controlnet:
        copy_writable(KIT / "sd-webui-controlnet", work / "sd-webui-controlnet")
        env["SD_WEBUI_CONTROLNET"] = str(work / "sd-webui-controlnet")
    if cuda_visible(str(python)):
        env["SD_WEBUI_GPU"] = "1"
    return env


def run(args) -> int:
    env = lay_out(Path(args.work), args.controlnet)
    print("device_kit: " + " ".join(f"{k}={env[k]}" for k in sorted(env) if k.startswith("SD_WEBUI_")), flush=True)
    status = 0
    for command in args.commands:
        print(f"device_kit: $ {command}", flush=True)
        result = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env)
        print(f"device_kit: exit {result.returncode}: {command}", flush=True)
        status = status or result.returncode
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb")
    run_parser = sub.add_parser("run", help="lay out the kit and run commands in its environment")
    run_parser.add_argument("--controlnet", action="store_true", help="also lay out sd-webui-controlnet")
    run_parser.add_argument("--work", default=str(WORK), help="where the webui and wheels go (default: %(default)s)")
    run_parser.add_argument("commands", nargs="+", help="shell commands, each run with bash -c in the repository")
    args = parser.parse_args()
    if args.verb == "run":
        return run(args)
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
