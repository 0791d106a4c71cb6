"""Run by each benchmark script (``runpy.run_path``), so that ``python bench/<script>.py`` can import the extension as
``sd_webui_onediff`` -- the name webui's adapter and the tests use -- without leaving a bare module name behind."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "sd_webui_onediff" not in sys.modules:
    spec = importlib.util.spec_from_file_location("sd_webui_onediff", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["sd_webui_onediff"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["sd_webui_onediff"])
