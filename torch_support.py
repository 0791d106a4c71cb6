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
