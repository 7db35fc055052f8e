#!/usr/bin/env bash
# Run HERE, before a session's GPU check: the lent GPU machine has torch, onnx, onnxruntime (CPU build only),
# tokenizers, transformers, rich and numpy, and cannot download. onnxruntime-gpu (a ~256 MB wheel) must travel,
# but one device call carries at most 64 MiB, working tree included. So this fetches the wheel for that machine's
# Python (3.12) and cuts it into 50 MB pieces in .devwheel/ (git-ignored here), to be carried one per call while
# the machine stays warm; benchmarks/gpu_run.sh puts them together there. Usage:
#
#   bash benchmarks/gpu_prepare.sh [VERSION]    # default: the onnxruntime-gpu version in .venv (or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
version=${1:-$("$python" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')} || {
    echo "onnxruntime-gpu is not installed for $python: give the version, e.g. bash $0 1.31.1" >&2; exit 2; }
dir=.devwheel
grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
rm -rf "$dir" && mkdir -p "$dir"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$dir" "onnxruntime-gpu==$version"
cd "$dir"
wheel=$(ls ./*.whl)
sha256sum "${wheel#./}" > SHA256SUMS
split -b 50M -d "$wheel" part.
rm "$wheel"
echo "pieces of ${wheel#./}:"
ls -l part.* SHA256SUMS
echo "device calls, back to back (the machine goes back after ~30 s idle): one per piece, each with carry"
echo "[\"$dir/part.NN\", \"$dir/SHA256SUMS\"] and command 'ls -l $dir'; the last one runs 'bash benchmarks/gpu_run.sh'."
