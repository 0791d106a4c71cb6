"""Run by webui at start, in a process of its own (webui skips it with --skip-prepare-environment): installs only what
is missing, from PyPI, with pinned version ranges; never touches torch itself."""
import importlib.util
import re
import sys

import launch
import torch

from torch_support import missing_requirements  # this folder is sys.path[0]: install.py runs as its own process

requirements, message = missing_requirements(
    torch.__version__, sys.platform, torch.version.cuda is not None, importlib.util.find_spec("triton") is not None
)
if message:
    print(message)
for requirement in requirements:
    if not launch.is_installed(re.split(r"[<>=!]", requirement)[0]):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for OneDiff")
