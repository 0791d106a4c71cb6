"""Loads the extension as the package ``sd_webui_onediff``, the way ``scripts/onediff.py`` does inside webui, and puts
webui's own ``repositories/`` first on the path when ``SD_WEBUI_PATH`` names a webui checkout."""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WEBUI_PATH = Path(os.environ["SD_WEBUI_PATH"]) if os.environ.get("SD_WEBUI_PATH") else None
if WEBUI_PATH and (WEBUI_PATH / "repositories").is_dir():
    for repository in ("generative-models", "stable-diffusion-stability-ai"):
        sys.path.insert(0, str(WEBUI_PATH / "repositories" / repository))

runpy.run_path(str(ROOT / "bench" / "bootstrap.py"))  # the loader the benchmark scripts use
