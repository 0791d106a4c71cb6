"""The oldest torch this extension runs on, checked before the engine is imported."""
from __future__ import annotations

import re

MIN_TORCH = (2, 7)
"""torch.compiler.save_cache_artifacts/load_cache_artifacts (compiler caches on disk) first shipped in 2.7."""


def torch_version_problem(version: str) -> str | None:
    """None when ``version`` is supported, else a message that says what to do."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and tuple(int(part) for part in match.groups()) >= MIN_TORCH:
        return None
    return (
        f"OneDiff needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, but this webui runs torch {version}. "
        "Upgrade it as the README's 'Requirements' section shows (TORCH_COMMAND with --reinstall-torch); "
        "until then images are generated without acceleration."
    )


TRITON_WINDOWS_FOR_TORCH = {(2, 7): "triton-windows>=3.3,<3.4", (2, 8): "triton-windows>=3.4,<3.5", (2, 9): "triton-windows>=3.5,<3.6"}
"""Inductor generates Triton kernels for CUDA GPUs. Linux wheels of torch bring Triton; on Windows it comes from the
triton-windows package, whose minor version must match the torch it was built for (its README's table)."""


def missing_requirements(torch_version: str, platform: str, cuda: bool, triton_installed: bool) -> tuple[list[str], str | None]:
    """What ``install.py`` should pip-install, and a message for what it cannot fix by itself."""
    problem = torch_version_problem(torch_version)
    if problem:
        return [], problem
    if not cuda or triton_installed or not platform.startswith("win"):
        return [], None
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    requirement = TRITON_WINDOWS_FOR_TORCH.get((int(match.group(1)), int(match.group(2))))
    if requirement is None:
        return [], (
            f"OneDiff needs Triton for torch {torch_version} on Windows: install the triton-windows release made for it "
            "into webui's venv (pip install \"triton-windows<X\", see that package's version table)."
        )
    return [requirement], None
