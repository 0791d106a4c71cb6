#!/usr/bin/env bash
# Runs the extension's whole test suite: the core tests (CPU is enough) and tests/webui/, which start a real webui
# v1.10.1 offline with this extension. With SD_WEBUI_PATH unset, tools/make_webui.py makes that webui first (a copy of
# ../shared/webui-v1.10.1, or a clone; its venv is built once and reused from ~/.cache/onediff-sd-webui). If no webui
# can be made, the run fails and says why: webui tests are never skipped for want of one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -r tests/requirements.txt
# ldm's UNetModel (the SD1.x/SD2.x code webui runs) from PyPI; --no-deps: its pins are for training, not needed here.
"$PYTHON" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
if [ -z "${SD_WEBUI_PATH:-}" ]; then
  exports=$("$PYTHON" tools/make_webui.py) || { echo "tests/run.sh: could not make a webui to test against (see above)" >&2; exit 1; }
  eval "$exports"
fi
export ONEDIFF_REQUIRE_WEBUI=1  # tests/webui/conftest.py: a missing webui fails the run instead of skipping
# benchmark smoke runs: the tables print and compiled agrees with eager (no timing is asserted)
"$PYTHON" bench/unet_bench.py --tiny --device cpu --repeat 2
"$PYTHON" bench/sampler_bench.py --tiny --device cpu --steps 4
"$PYTHON" bench/host_order.py --tiny --device cpu --repeat 2
# --rootdir=tests: the extension folder has an __init__.py, and pytest would otherwise import it as a package and put
# the folder *above* the checkout first on sys.path, where any stray module there shadows real ones.
exec "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider --rootdir=tests "$@"
