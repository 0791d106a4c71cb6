#!/usr/bin/env python3
"""Make a stable-diffusion-webui v1.10.1 to test this extension against (and, with ``--start``, to run it in).

What it lays out, in a cache folder outside the checkout (``--cache``, default ``$ONEDIFF_WEBUI_CACHE`` or
``~/.cache/onediff-sd-webui``):

- ``webui-v1.10.1/``: a writable copy of ``shared/webui-v1.10.1`` when that folder is found beside the checkout (or
  named by ``--shared``), else a ``git clone`` of the tag and of the five repositories at the commits webui pins;
- ``sd-webui-controlnet/``: sd-webui-controlnet v1.1.455, copied from ``shared/`` or cloned, for the ControlNet tests
  (linked into a webui's ``extensions/`` only where a test or ``--controlnet`` asks for it);
- ``venvs/<key>/``: webui's Python environment with ControlNet's requirements, keyed by everything that goes into it
  (requirement files, the torchvision patch, the Python version), built once and reused; ``webui-v1.10.1/venv`` links
  to it, so webui's own ``webui.sh`` uses it too;
- offline only (the ``shared/webui-offline`` data is found): ``hf_home/`` (the tokenizer and config files webui would
  download), webui's settings for running offline, and tiny random checkpoints in ``models/Stable-diffusion``.

Prints the shell variables that point the tests at it (``SD_WEBUI_PATH``, ``SD_WEBUI_PYTHON``,
``SD_WEBUI_CONTROLNET``, ``SD_WEBUI_OFFLINE``); ``eval "$(python3 tools/make_webui.py)"`` sets them. Every step that
fails stops the run with a message saying what failed and what to do. With ``--start``, this extension is linked into
the webui's ``extensions/`` and webui is started with ``--api`` (extra webui flags after ``--``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "onediff_sd_webui"
WEBUI_TAG = "v1.10.1"
WEBUI_URL = "https://github.com/AUTOMATIC1111/stable-diffusion-webui.git"
CONTROLNET_URL = "https://github.com/Mikubill/sd-webui-controlnet.git"
CONTROLNET_COMMIT = "56cec5b2"  # v1.1.455
CONTROLNET_DIR = "sd-webui-controlnet"
# (folder under repositories/, the variable in webui's launch_utils.py holding its URL, and its commit)
WEBUI_REPOSITORIES = (
    ("stable-diffusion-webui-assets", "assets_repo", "assets_commit_hash"),
    ("stable-diffusion-stability-ai", "stable_diffusion_repo", "stable_diffusion_commit_hash"),
    ("generative-models", "stable_diffusion_xl_repo", "stable_diffusion_xl_commit_hash"),
    ("k-diffusion", "k_diffusion_repo", "k_diffusion_commit_hash"),
    ("BLIP", "blip_repo", "blip_commit_hash"),
)
# ControlNet's requirements beside webui's pins: onnxruntime comes from its install.py (webui skips that offline);
# mediapipe past 0.10.9 drops ``mp.solutions``, which controlnet_aux imports, or needs protobuf >= 4 (webui pins 3.20).
CONTROLNET_EXTRA = ["onnxruntime", "mediapipe==0.10.9"]
# pip may move these two of webui's pins to satisfy ControlNet's ``timm<=0.9.5`` and ``pydantic<=1.10.17``.
CONTROLNET_UNPINNED = {"timm", "pydantic"}
OFFLINE_FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--use-cpu", "all",
                 "--no-half", "--no-download-sd-model"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}
BUILDER_VERSION = "1"  # part of the venv key: bump when the way the venv is built changes


class MakeError(RuntimeError):
    """A step failed; the message says which and what to do."""


def log(message: str) -> None:
    print(f"make_webui: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, **kwargs) -> None:
    log(f"{what}: {shlex.join(str(c) for c in cmd)}")
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        raise MakeError(f"{what} failed (exit {result.returncode}); the output above says why")


def find_shared(explicit: str | None) -> Path | None:
    """``shared/`` beside the checkout or above it (as CI and the developers' machines lay it out)."""
    if explicit:
        path = Path(explicit).resolve()
        if not (path / "webui-v1.10.1" / "launch.py").exists():
            raise MakeError(f"--shared {explicit} holds no webui-v1.10.1/launch.py")
        return path
    for parent in REPO_ROOT.parents:
        if (parent / "shared" / "webui-v1.10.1" / "launch.py").exists():
            return parent / "shared"
    return None


def copy_writable(source: Path, target: Path) -> None:
    """shared/ is read-only and webui writes into its own folder: copy, then give the owner write permission."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, symlinks=True)
    for root, dirs, files in os.walk(partial):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o200)
    os.chmod(partial, os.stat(partial).st_mode | 0o200)
    partial.rename(target)


def git_checkout(url: str, ref: str, target: Path) -> None:
    if not shutil.which("git"):
        raise MakeError("git is not installed and no shared/webui-v1.10.1 was found: install git, or pass --shared")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run(["git", "clone", "--quiet", url, str(partial)], f"cloning {url}")
    run(["git", "-C", str(partial), "checkout", "--quiet", ref], f"checking out {ref}")
    partial.rename(target)


def pinned_repositories(webui: Path) -> list[tuple[str, str, str]]:
    """(folder, URL, commit) of each repository webui clones, read from the webui's own launch_utils.py; the
    environment variables that webui honours there (``STABLE_DIFFUSION_REPO``, ``..._COMMIT_HASH``) override them."""
    source = (webui / "modules" / "launch_utils.py").read_text(encoding="utf8")

    def value(variable: str) -> str:
        match = re.search(rf"{variable} = os\.environ\.get\('(\w+)', ['\"]([^'\"]+)['\"]\)", source)
        if not match:
            raise MakeError(f"{variable} not found in {webui}/modules/launch_utils.py: is this webui {WEBUI_TAG}?")
        return os.environ.get(match.group(1), match.group(2))

    return [(folder, value(url), value(commit)) for folder, url, commit in WEBUI_REPOSITORIES]


def make_webui_tree(cache: Path, shared: Path | None, url: str = WEBUI_URL) -> Path:
    webui = cache / f"webui-{WEBUI_TAG}"
    if (webui / "launch.py").exists():
        return webui
    if shared is not None:
        log(f"copying {shared / webui.name} to {webui}")
        copy_writable(shared / webui.name, webui)
        return webui
    git_checkout(url, WEBUI_TAG, webui)
    for folder, url, commit in pinned_repositories(webui):
        git_checkout(url, commit, webui / "repositories" / folder)
    return webui


def make_controlnet_tree(cache: Path, shared: Path | None, url: str = CONTROLNET_URL) -> Path:
    target = cache / CONTROLNET_DIR
    if (target / "scripts").is_dir():
        return target
    source = shared / "sd-webui-controlnet-v1.1.455" if shared is not None else None
    if source is not None and source.is_dir():
        log(f"copying {source} to {target}")
        copy_writable(source, target)
    else:
        git_checkout(url, CONTROLNET_COMMIT, target)
    return target


def webui_requirements(webui: Path, shared: Path | None) -> str:
    """The requirement lines of webui's venv. Offline (shared/ found): the CPU list made for this machine, which pins
    torch 2.13.0. Otherwise webui's own pins with torch from ``TORCH_COMMAND``-style ``--torch`` (see main)."""
    if shared is not None and (shared / "webui-offline" / "requirements-cpu.txt").exists():
        return (shared / "webui-offline" / "requirements-cpu.txt").read_text(encoding="utf8")
    text = (webui / "requirements_versions.txt").read_text(encoding="utf8").replace("\r\n", "\n")
    # webui's setuptools==69.5.1 is older than torch >= 2.7 needs; torch itself is installed separately.
    lines = [line for line in text.splitlines() if not re.match(r"\s*(setuptools|torch)\b", line)]
    return "\n".join(lines) + "\n"


def venv_key(*parts: str) -> str:
    digest = hashlib.sha256(BUILDER_VERSION.encode())
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def python_for_webui(explicit: str | None) -> str:
    """webui 1.10 runs on Python 3.10 and 3.11 (3.12 breaks several of its pinned packages)."""
    candidates = [explicit] if explicit else ["python3.11", "python3.10", "python3"]
    for name in candidates:
        path = shutil.which(name) if name else None
        if not path:
            continue
        version = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        if version in ("3.10", "3.11"):
            return path
        if explicit:
            raise MakeError(f"--python {explicit} is Python {version}; webui {WEBUI_TAG} needs 3.10 or 3.11")
    raise MakeError(f"no Python 3.10 or 3.11 found (tried {', '.join(candidates)}): install one, or pass --python")


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    if not found:
        raise MakeError(f"{venv} has no lib/python3.*/site-packages")
    return found[0]


def make_venv(cache: Path, webui: Path, controlnet: Path, shared: Path | None, python: str, torch_spec: str) -> Path:
    requirements = webui_requirements(webui, shared)
    patch = shared / "webui-offline" / "torchvision-0.28.0-meta-registrations.patch" if shared is not None else None
    patch_text = patch.read_text(encoding="utf8") if patch is not None and patch.exists() else ""
    controlnet_requirements = (controlnet / "requirements.txt").read_text(encoding="utf8")
    python_version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True,
                                    text=True).stdout
    offline = shared is not None
    key = venv_key(requirements, patch_text, controlnet_requirements, " ".join(CONTROLNET_EXTRA), python_version,
                   "" if offline else torch_spec)
    venv = cache / "venvs" / key
    if (venv / "ready").exists():
        return venv
    log(f"building webui's venv {venv} (once; later runs reuse it)")
    shutil.rmtree(venv, ignore_errors=True)
    run([python, "-m", "venv", str(venv)], "creating the venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        webui_list = Path(tmp) / "webui-requirements.txt"
        webui_list.write_text(requirements, encoding="utf8")
        if not offline:
            run(pip + shlex.split(torch_spec), "installing torch (set --torch for your CUDA build)")
        run(pip + ["-r", str(webui_list)], "installing webui's requirements")
        if patch_text:
            # PyPI's torchvision 0.28 is a CUDA build whose import fails beside the CPU torch (shared/ says why).
            run(["patch", "-p1", "--forward", "--quiet", "-i", str(patch)], "patching torchvision for the CPU torch",
                cwd=site_packages(venv))
        # ControlNet's requirements with every other package held where webui pinned it.
        freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                                check=True).stdout
        held = Path(tmp) / "held.txt"
        held.write_text("\n".join(line for line in freeze.splitlines()
                                  if "==" in line and line.split("==")[0].lower() not in CONTROLNET_UNPINNED) + "\n")
        run(pip + ["-c", str(held), "-r", str(controlnet / "requirements.txt"), *CONTROLNET_EXTRA],
            "installing sd-webui-controlnet's requirements")
    run([str(venv / "bin" / "python"), "-m", "pip", "check"], "checking the venv's requirements (pip check)")
    run([str(venv / "bin" / "python"), "-c", "import torch, torchvision, gradio, transformers, open_clip, cv2, controlnet_aux"],
        "importing the venv's main packages")
    (venv / "ready").write_text(python_version)
    return venv


def link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        if path.is_symlink() and path.resolve() == target.resolve():
            return
        if path.is_dir() and not path.is_symlink():
            raise MakeError(f"{path} is a folder, not a link made by this script: move it away and run again")
        path.unlink()
    path.symlink_to(target, target_is_directory=True)


def make_offline_data(cache: Path, webui: Path, shared: Path) -> Path:
    """hf_home copy (the HF libraries write into their cache), settings without network use, tiny checkpoints."""
    offline = shared / "webui-offline"
    hf_home = cache / "hf_home"
    if not hf_home.exists():
        copy_writable(offline / "hf_home", hf_home)
    config = webui / "config.json"
    if not config.exists():
        shutil.copyfile(REPO_ROOT / "tests" / "webui" / "webui-config.json", config)
    return hf_home


def make_tiny_checkpoints(webui: Path, python: Path, hf_home: Path) -> None:
    models = webui / "models" / "Stable-diffusion"
    if any(models.glob("tiny-*.safetensors")):
        return
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(hf_home), "SD_WEBUI_PATH": str(webui)}
    env.pop("PYTHONPATH", None)
    run([str(python), str(REPO_ROOT / "tests" / "webui" / "checkpoints.py"), str(models), "--webui", str(webui),
         "--lora-dir", str(webui / "models" / "Lora")], "building tiny random checkpoints", env=env)


def start(webui: Path, python: Path, hf_home: Path | None, controlnet: Path | None, webui_args: list[str]) -> None:
    extensions = webui / "extensions"
    extensions.mkdir(exist_ok=True)
    link(extensions / EXTENSION_NAME, REPO_ROOT)
    if controlnet is not None:
        link(extensions / CONTROLNET_DIR, controlnet)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    flags = ["--api", *webui_args]
    if hf_home is not None:
        env.update(OFFLINE_ENV, HF_HOME=str(hf_home))
        flags = ["--api", *OFFLINE_FLAGS, *webui_args]
    command = [str(python), "launch.py", *flags]
    log(f"starting webui in {webui}: {shlex.join(command)}")
    os.chdir(webui)
    os.execve(str(python), command, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.environ.get("ONEDIFF_WEBUI_CACHE")
                        or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onediff-sd-webui"),
                        help="folder for the webui, its venv and data (default: %(default)s)")
    parser.add_argument("--shared", help="the shared/ folder with webui-v1.10.1 (default: found beside the checkout)")
    parser.add_argument("--webui-url", default=WEBUI_URL, help="where to clone webui from without shared/ "
                        "(default: %(default)s; its repositories come from the URLs webui pins)")
    parser.add_argument("--controlnet-url", default=CONTROLNET_URL, help="where to clone sd-webui-controlnet from "
                        "without shared/ (default: %(default)s)")
    parser.add_argument("--python", help="Python 3.10 or 3.11 for webui's venv (default: python3.11, python3.10)")
    parser.add_argument("--torch", default="torch==2.13.0 torchvision==0.28.0",
                        help="pip arguments for torch when webui is cloned, e.g. with your CUDA build's --index-url "
                             "(default: %(default)s)")
    parser.add_argument("--start", action="store_true",
                        help="link this extension into the webui and start it with --api (webui flags after --)")
    parser.add_argument("--controlnet", action="store_true", help="with --start: also link sd-webui-controlnet")
    parser.add_argument("webui_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cache = Path(args.cache).expanduser().resolve()
        cache.mkdir(parents=True, exist_ok=True)
        shared = find_shared(args.shared)
        python = python_for_webui(args.python)
        webui = make_webui_tree(cache, shared, args.webui_url)
        controlnet = make_controlnet_tree(cache, shared, args.controlnet_url)
        venv = make_venv(cache, webui, controlnet, shared, python, args.torch)
        link(webui / "venv", venv)
        hf_home = make_offline_data(cache, webui, shared) if shared is not None else None
        if hf_home is not None and args.start:
            make_tiny_checkpoints(webui, venv / "bin" / "python", hf_home)
    except MakeError as error:
        log(f"error: {error}")
        return 1
    if args.start:
        start(webui, venv / "bin" / "python", hf_home, controlnet if args.controlnet else None, args.webui_args)
    print(f"export SD_WEBUI_PATH={shlex.quote(str(webui))}")
    print(f"export SD_WEBUI_PYTHON={shlex.quote(str(venv / 'bin' / 'python'))}")
    print(f"export SD_WEBUI_CONTROLNET={shlex.quote(str(controlnet))}")
    if shared is not None:
        print(f"export SD_WEBUI_OFFLINE={shlex.quote(str(shared / 'webui-offline'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
