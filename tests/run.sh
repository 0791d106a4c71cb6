#!/usr/bin/env bash
# Runs the extension's tests. Core tests run anywhere (CPU is enough); tests/webui/ also run when SD_WEBUI_PATH names
# a webui v1.10.x checkout (they start it offline; see tests/webui/conftest.py), and are skipped, saying why, when not.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -r tests/requirements.txt
# ldm's UNetModel (the SD1.x/SD2.x code webui runs) from PyPI; --no-deps: its pins are for training, not needed here.
"$PYTHON" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
# benchmark smoke runs: the tables print and compiled agrees with eager (no timing is asserted)
"$PYTHON" bench/unet_bench.py --tiny --device cpu --repeat 2
"$PYTHON" bench/sampler_bench.py --tiny --device cpu --steps 4
# --rootdir=tests: the extension folder has an __init__.py, and pytest would otherwise import it as a package and put
# the folder *above* the checkout first on sys.path, where any stray module there shadows real ones.
exec "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider --rootdir=tests "$@"
