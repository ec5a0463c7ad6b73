#!/usr/bin/env bash
# Developer build: compile fastnca._C (and _C_cuda when nvcc is found) next to the
# Python sources, so that `PYTHONPATH=python pytest` uses the working tree.
# Usage: scripts/build_inplace.sh [build-dir]   (FASTNCA_CUDA=off to skip CUDA; TARGET=_C or
#        _C_cuda to build one module)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/inplace}
cmake -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$(command -v python)" \
      -DFASTNCA_CUDA="${FASTNCA_CUDA:-auto}" -DFASTNCA_CUDA_ARCHS="${FASTNCA_CUDA_ARCHS:-80;90}" >/dev/null
cmake --build "$build" -j "${JOBS:-2}" ${TARGET:+--target "$TARGET"}
