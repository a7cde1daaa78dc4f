#!/usr/bin/env bash
# Runs the test suite on a GPU machine (the lent device, or any with CUDA and cupy), where every
# math test also runs on the cupy backend. The device image lacks trio, outcome, pytest-trio and
# mnist1d: fetch them first, here, with ../shared/tools/device-wheels (into .whl/), and carry .whl.
# Usage (from the repository root, on the GPU machine): bash experiments/device_tests.sh [pytest args]
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, '| numpy', numpy.__version__, '| GPUs', cupy.cuda.runtime.getDeviceCount())"
if [ $# -eq 0 ]; then set -- tests; fi
python3 -m pytest -q -p no:cacheprovider -m "not slow" "$@"
