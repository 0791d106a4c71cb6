"""Loads the extension as the package ``sd_webui_onediff``, the way ``scripts/onediff.py`` does inside webui, and puts
webui's own ``repositories/`` first on the path when ``SD_WEBUI_PATH`` names a webui checkout."""
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sd_webui_onediff"

WEBUI_PATH = Path(os.environ["SD_WEBUI_PATH"]) if os.environ.get("SD_WEBUI_PATH") else None
if WEBUI_PATH and (WEBUI_PATH / "repositories").is_dir():
    for repository in ("generative-models", "stable-diffusion-stability-ai"):
        sys.path.insert(0, str(WEBUI_PATH / "repositories" / repository))

if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[PACKAGE])
