#!/usr/bin/env bash
# Issue 9 in one device call: install the carried wheels, check the GPUs (count, topology, peer
# access), run the multi-GPU tests, run the multi-GPU benchmark, and leave everything in $OUT.
#
# The device call (run tool), on a machine with several GPUs:
#   run(kind="nvidia-h100-x8", carry=[".whl"], timeout_s=600,
#       command="bash experiments/multi_gpu.sh")
#   (nvidia-h100-x4 / -x2, or nvidia-h200-x2/x4/x8, work the same: K follows the GPUs present)
# The one-GPU stand-in (K = 1, plus 4 stages sharing cuda:0; every test that needs 2+ GPUs skips):
#   run(kind="nvidia-h100-x1", carry=[".whl"], timeout_s=600,
#       command="bash experiments/multi_gpu.sh --standin")
# Before either: ../shared/tools/device-wheels (fills .whl/ with trio, outcome, sniffio,
# pytest-trio, mnist1d: what the device image lacks).
#
# Writes to $OUT (else runs/multi_gpu): gpus.txt (nvidia-smi, topology, peer access),
# multi_gpu_tests.log, multi_gpu.log, multi_gpu.json, multi_gpu.md (the table for
# docs/benchmarks.md). Exit status: the tests' (the benchmark runs even when a test fails).
set -uo pipefail
# NVLink multicast off, in this shell and every process it starts (the device README requires it:
# a program using it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
standin=0
if [ "${1:-}" = "--standin" ]; then standin=1; shift; fi
out="${OUT:-runs/multi_gpu}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "^WARNING" || true

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  echo "--- nvidia-smi topo -m"
  nvidia-smi topo -m || true
  echo "--- cupy"
  python3 - <<'EOF'
import cupy
rt = cupy.cuda.runtime
n = rt.getDeviceCount()
print(f"cupy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, {n} GPU(s)")
for i in range(n):
    row = ["self" if i == j else ("yes" if rt.deviceCanAccessPeer(i, j) else "NO") for j in range(n)]
    print(f"peer access from cuda:{i}: " + " ".join(f"{j}:{v}" for j, v in enumerate(row)))
EOF
  python3 -c "import torch; print('torch', torch.__version__, 'NCCL', torch.cuda.nccl.version())" \
    || echo "torch: not importable (NCCL reference rates will be skipped)"
} 2>&1 | tee "$out/gpus.txt"

# the multi-GPU tests, and the GPU runtime tests they build on
python3 -m pytest -q -p no:cacheprovider -rs tests/test_multi_gpu.py tests/test_gpu_runtime.py \
  2>&1 | tee "$out/multi_gpu_tests.log"
status=${PIPESTATUS[0]}

bench=(--out "$out")
if [ "$standin" = 1 ]; then bench+=(--max-k 4 --same-gpu true); fi
PYTHONUNBUFFERED=1 python3 experiments/multi_gpu.py "${bench[@]}" "$@" 2>&1 | tee "$out/multi_gpu.log"
echo "tests exit status: $status; benchmark exit status: ${PIPESTATUS[0]}"
exit "$status"
