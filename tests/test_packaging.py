"""Webui imports every extension's modules into one ``sys.modules``, where its builtin Lora extension owns ``lora``,
``network`` and ``networks``: our packages live under ``sd_webui_onediff.*`` only and never by their bare names."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
WEBUI_OWNED = {"lora", "network", "networks"}


def python_files():
    """Every module webui may import; install.py runs as a process of its own and is left out."""
    return [p for p in ROOT.rglob("*.py")
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts) and p != ROOT / "install.py"]


def test_no_module_imports_our_packages_by_their_bare_names():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names
                          if name.split(".")[0] in {*OUR_PACKAGES, *WEBUI_OWNED, "api_requests", "script_args", "torch_support"}]
    assert not offenders


def test_loading_the_extension_leaves_the_bare_names_free():
    """Loads every core module the way scripts/onediff.py does, with the extension folder first on sys.path as webui
    has it while loading an extension's scripts, and with webui's builtin ``lora`` already imported."""
    program = f"""
import importlib, importlib.util, pkgutil, sys, types
sys.path.insert(0, {str(ROOT)!r})
sys.modules["lora"] = builtin_lora = types.ModuleType("lora")
spec = importlib.util.spec_from_file_location("sd_webui_onediff", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
sys.modules["sd_webui_onediff"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["sd_webui_onediff"])
for package in {OUR_PACKAGES!r}:
    module = importlib.import_module("sd_webui_onediff." + package)
    for info in pkgutil.walk_packages(module.__path__, module.__name__ + "."):
        importlib.import_module(info.name)
for name in ("api_requests", "script_args", "torch_support"):
    importlib.import_module("sd_webui_onediff." + name)
assert sys.modules["lora"] is builtin_lora, "webui's lora was replaced"
ours = {str(ROOT)!r}
leaked = sorted(name for name, module in sys.modules.items()
                if not name.startswith("sd_webui_onediff") and (getattr(module, "__file__", None) or "").startswith(ours))
assert not leaked, leaked
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
