"""Compiler caches on disk, in PyTorch's own format.

``torch.compiler.save_cache_artifacts()`` gathers what this process compiled (Inductor's FX-graph and autotuning
caches, AOTAutograd's cache); ``load_cache_artifacts()`` puts them back so that the next compile of the same graphs skips
code generation. Each cache is ``<name>.torchcache`` (PyTorch's bytes, untouched) with ``<name>.json`` beside it saying
which torch, Triton and device made it: artifacts from another build or GPU are refused before PyTorch sees them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ARTIFACTS_SUFFIX = ".torchcache"
METADATA_SUFFIX = ".json"
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class CacheError(RuntimeError):
    """A cache could not be saved or loaded; the message says why and what to do. ``reason`` says why in a few words
    and names no local path: it goes into the images' infotext, the one place API clients see."""

    def __init__(self, message: str, reason: str = "cannot be used"):
        super().__init__(message)
        self.reason = reason


def environment(device: torch.device) -> dict[str, str]:
    """What compiled code depends on besides the model: the compiler stack and the device it was built for."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {"torch": torch.__version__, "triton": triton_version, "device": device.type}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
        env["cuda"] = str(torch.version.cuda)
    return env


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not _VALID_NAME.match(name) or name.endswith(METADATA_SUFFIX):
        raise CacheError(
            f"invalid cache name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
            reason="has an invalid name",
        )
    return name


def list_caches(cache_dir: Path) -> list[str]:
    if not cache_dir.is_dir():
        return []
    return sorted(p.name[: -len(ARTIFACTS_SUFFIX)] for p in cache_dir.glob(f"*{ARTIFACTS_SUFFIX}"))


def save(cache_dir: Path, name: str, device: torch.device, description: dict[str, str] | None = None) -> Path:
    """Writes everything this process has compiled so far; returns the artifacts file."""
    name = check_name(name)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        raise CacheError(f"nothing to save as {name!r}: no UNet has been compiled in this webui session yet")
    artifacts, _info = saved
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}{ARTIFACTS_SUFFIX}"
    metadata = {"environment": environment(device), **({"description": description} if description else {})}
    path.write_bytes(artifacts)
    (cache_dir / f"{name}{METADATA_SUFFIX}").write_text(json.dumps(metadata, indent=1))
    return path


def load(cache_dir: Path, name: str, device: torch.device, loaded: set | None = None) -> bool:
    """Hands a saved cache to PyTorch, or raises ``CacheError`` saying why it cannot be used.

    ``loaded``: the files this process handed over already, each as (path, size, modification time), added to here.
    PyTorch writes what it is given into its on-disk caches, so a file found there unchanged is not read again and
    False is returned."""
    name = check_name(name)
    path = cache_dir / f"{name}{ARTIFACTS_SUFFIX}"
    if not path.is_file():
        raise CacheError(
            f"compiler cache {name!r} not found in {cache_dir}: press the refresh button and choose another", reason="not found"
        )
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if loaded is not None and stamp in loaded:
        return False
    try:
        metadata = json.loads((cache_dir / f"{name}{METADATA_SUFFIX}").read_text())
        made_with = metadata["environment"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheError(
            f"compiler cache {name!r} has no readable {name}{METADATA_SUFFIX} ({error}); save it again",
            reason="has no readable metadata",
        ) from error
    here = environment(device)
    if made_with != here:
        differences = ", ".join(
            f"{key} {made_with.get(key, '?')} (here {here.get(key, '?')})"
            for key in sorted(set(made_with) | set(here))
            if made_with.get(key) != here.get(key)
        )
        raise CacheError(
            f"compiler cache {name!r} was made with another setup: {differences}; save a new one here",
            reason="made with another setup",
        )
    damaged = f"compiler cache {name!r} is damaged; delete {path.name} and save it again"
    try:
        artifacts_info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as error:  # noqa: BLE001 -- PyTorch raises assorted errors for damaged bytes
        raise CacheError(f"{damaged} ({type(error).__name__}: {error})", reason="damaged") from error
    if artifacts_info is None:  # PyTorch logs a failed checksum and returns None
        raise CacheError(damaged, reason="damaged")
    if loaded is not None:
        loaded.add(stamp)
    return True
