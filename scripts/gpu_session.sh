#!/usr/bin/env bash
# What a session with a lent GPU runs, in the order the project asks for, in as few device
# calls as possible (the device time is short):
#   build     fastnca._C and fastnca._C_cuda in place, for this GPU's architecture only
#   test      pytest -m gpu: every CUDA and Triton kernel against the reference on the GPU
#   sanitize  scripts/sanitize_cuda.sh: compute-sanitizer memcheck, racecheck, initcheck, synccheck
#   bench     fastnca bench --json: every op and model against PyTorch on this GPU
# Logs and the benchmark JSON go to $OUT (the device tool's return folder) or, without it,
# build/gpu-session/. On a copied tree without .git, set FASTNCA_GIT_COMMIT so the JSON
# names the commit it measured.
# Usage: scripts/gpu_session.sh STAGE...   (default: build test sanitize bench)
#   STAGE: build, test (all of -m gpu), test-cuda, test-triton (its two halves), sanitize,
#          bench, bench-quick
# Each device call runs at most 10 minutes, and Triton compiles ~500 kernel variants for
# the GPU tests, so the suggested calls are: `build test-cuda sanitize`, then `test-triton`
# (a warm machine keeps the build and the Triton cache), then `bench`.
# Tests run with FASTNCA_TRITON_AUTOTUNE=0 (one compile per variant, not one per tile) and
# on 8 processes when pytest-xdist is there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-session}
mkdir -p "$out"
py=$(command -v python3 || command -v python)
export PATH="$(dirname "$py"):$PATH" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(build test sanitize bench)
status=0
for stage in "${stages[@]}"; do
  echo "=== $stage ($(date +%T))"
  case "$stage" in
    build)
      arch=$("$py" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
      FASTNCA_CUDA=on FASTNCA_CUDA_ARCHS="${FASTNCA_CUDA_ARCHS:-$arch}" JOBS="${JOBS:-$(nproc)}" \
        scripts/build_inplace.sh build/gpu 2>&1 | tee "$out/build.log" || { echo "build failed"; exit 1; }
      "$py" -m fastnca.cli info 2>&1 | tee "$out/info.txt" ;;
    test|test-cuda|test-triton)
      files=()
      [[ $stage == test-cuda ]] && files=(tests/test_cuda_kernels.py)
      [[ $stage == test-triton ]] && files=($(ls tests/test_*.py | grep -v test_cuda_kernels.py))
      xdist=()
      "$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
      FASTNCA_TRITON_AUTOTUNE=0 "$py" -m pytest -m gpu -q -rfE -p no:cacheprovider "${xdist[@]}" \
        --junitxml="$out/$stage.xml" "${files[@]}" 2>&1 | tee "$out/$stage.log" || status=1 ;;
    sanitize)
      scripts/sanitize_cuda.sh 2>&1 | tee "$out/sanitize.log" || status=1 ;;
    bench)
      "$py" -m fastnca.cli bench --json "$out/bench.json" 2>&1 | tee "$out/bench.log" || status=1 ;;
    bench-quick)
      "$py" -m fastnca.cli bench --quick --json "$out/bench-quick.json" 2>&1 | tee "$out/bench.log" || status=1 ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
exit $status
