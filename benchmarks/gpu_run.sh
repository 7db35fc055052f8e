#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, in the call that carries the last piece from benchmarks/gpu_prepare.sh:
# puts onnxruntime-gpu together (checked against its SHA-256), unpacks it ahead of the machine's CPU-only
# onnxruntime, runs the CUDA-marked tests and python -m benchmarks.cuda (which rewrites its docs section). The logs and
# docs/benchmarks.md land in $OUT; copy the section back into docs/benchmarks.md here.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
dir=$PWD/.devwheel
wheel=$(awk '{print $2}' "$dir/SHA256SUMS")
cat "$dir"/part.* > "/tmp/$wheel"
if ! (cd /tmp && sha256sum -c "$dir/SHA256SUMS"); then
    echo "the pieces here do not make up $wheel (one missing or damaged): carry them again"; ls -l "$dir"; exit 2
fi
rm -rf /tmp/site
python3 -m zipfile -e "/tmp/$wheel" /tmp/site || { echo "cannot unpack $wheel"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import onnxruntime as o, torch; o.preload_dlls(); print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__)'
} 2>&1 | tee "$out/gpu.txt"
status=0  # the first failure (a failing test, a timeout's 124) becomes the exit status; every step still runs
timeout 240 python3 -m pytest -p no:cacheprovider -m cuda -rs tests/test_runtime.py tests/test_quantize.py 2>&1 \
    | tee "$out/pytest-cuda.log"
rc=$?; [ "$status" -ne 0 ] || status=$rc
timeout 420 python3 -m benchmarks.cuda 2>&1 | tee "$out/cuda.log"
rc=$?; [ "$status" -ne 0 ] || status=$rc
cp docs/benchmarks.md "$out/"
exit "$status"
