#!/usr/bin/env bash
# Sets a GPU machine up and runs the test suite there (the lent device, or any with CUDA and
# cupy), where every math test also runs on the cupy backend; optionally the GPU benchmark too.
# The device image lacks trio, outcome, pytest-trio and mnist1d: fetch them first, here, with
# ../shared/tools/device-wheels (into .whl/), and carry .whl.
# Usage (from the repository root, on the GPU machine):
#   bash experiments/device_tests.sh [--jobs N] [--bench] [--bench-only] [pytest args]
# --jobs N runs the test files in N pytest processes side by side (alternate files of
# tests/test_*.py; pytest options such as -x or -k go to each, but no paths): on the lent
# 16-core host the suite took about 310 s in 2 processes, 160-210 s in 4 and 150 s in 8 (H100,
# 2026-12-05), where the GPU's launches, not its compute, are the bound. --bench also runs
# experiments/bench_gpu.py after the tests (--bench-only: the benchmark alone); its JSON and
# the tests' log (device_tests.log: one file, every process's part in turn) go to $OUT when
# that is set (the lent device), else to runs/.
set -euo pipefail
bench=0
tests=1
jobs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bench) bench=1; shift ;;
    --bench-only) bench=1; tests=0; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    *) break ;;
  esac
done
out="${OUT:-runs}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, '| numpy', numpy.__version__, '| GPUs', cupy.cuda.runtime.getDeviceCount())"
status=0
if [ "$tests" = 1 ] && [ "$jobs" -gt 1 ]; then
  for arg in "$@"; do
    if [ -e "$arg" ]; then
      echo "device_tests.sh: --jobs splits tests/test_*.py itself; drop the path $arg" >&2
      exit 2
    fi
  done
  set +e
  # each process writes its own log; they are joined into one file at the end (the lent
  # device returns at most 8 files from $OUT: one log leaves room for a benchmark's outputs)
  parts=$(mktemp -d)
  pids=()
  for ((j = 0; j < jobs; j++)); do
    mapfile -t files < <(ls tests/test_*.py | awk -v j="$j" -v n="$jobs" 'NR % n == j')
    python3 -m pytest -q -p no:cacheprovider -m "not slow" "$@" "${files[@]}" \
      > "$parts/$j.log" 2>&1 &
    pids+=($!)
  done
  for ((j = 0; j < jobs; j++)); do
    wait "${pids[$j]}" || status=1
    echo "== process $j: $(tail -n 1 "$parts/$j.log")"
  done
  for ((j = 0; j < jobs; j++)); do
    echo "== process $j of $jobs"
    cat "$parts/$j.log"
  done > "$out/device_tests.log"
  rm -rf "$parts"
  grep -hE "^(FAILED|ERROR)" "$out/device_tests.log" || true
  set -e
elif [ "$tests" = 1 ]; then
  if [ $# -eq 0 ]; then set -- tests; fi
  set +e
  python3 -m pytest -q -p no:cacheprovider -m "not slow" "$@" 2>&1 | tee "$out/device_tests.log"
  status=${PIPESTATUS[0]}
  set -e
fi
if [ "$bench" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 experiments/bench_gpu.py --out "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench_gpu.log"
fi
exit "$status"
