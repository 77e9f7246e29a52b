#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU (no internet needed if torch, ninja, pybind11, pytest are
# installed): build with CUDA, run the whole test suite on CUDA, run the CUDA tests under compute-sanitizer,
# then run every GPU benchmark script (benchmarks/gpu_*.py) and print their tables.
#   bash benchmarks/gpu_check.sh            # uses `python` on PATH
#   PYTHON=/path/to/python OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/lrag-gpu-check}
mkdir -p "$OUT"
status=0

echo "=== GPU and toolchain"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
if [ -z "${CUDA_HOME:-}" ]; then
  top=$(echo | nvcc -x cu -E -v - 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$top" ] && export CUDA_HOME=$(cd "$top" && pwd)
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}"
arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}

echo "=== build (LRAG_EXT_CUDA=1, arch $TORCH_CUDA_ARCH_LIST)"
LRAG_EXT_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 || status=1
$PY -c "import lrag_ext; i = lrag_ext.build_info(); print(i); assert i['cuda']" || { echo "CUDA build failed"; exit 1; }

echo "=== test suite (CPU + CUDA parametrisations)"
$PY -m pytest -q -x tests 2>&1 | tail -30 || status=1

echo "=== compute-sanitizer (memcheck, racecheck, synccheck) on the CUDA tests"
if command -v compute-sanitizer >/dev/null || [ -x "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" ]; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  for tool in memcheck racecheck synccheck; do
    echo "--- $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
      $PY -m pytest -q -x -k "cuda" tests/test_cosine_topk.py 2>&1 | tail -8 || status=1
  done
else
  echo "compute-sanitizer not found"; status=1
fi

echo "=== benchmarks"
for script in benchmarks/gpu_*.py; do
  name=$(basename "$script" .py)
  echo "--- $name"
  $PY "$script" 2>&1 | tee "$OUT/$name.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "=== gpu_check done (status $status); tables in $OUT"
exit $status
