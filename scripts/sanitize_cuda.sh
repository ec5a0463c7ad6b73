#!/usr/bin/env bash
# Run fastnca's CUDA kernels under compute-sanitizer: memcheck (out-of-bounds and misaligned
# accesses), racecheck (shared-memory hazards: a missing __syncthreads), initcheck (reads of
# uninitialised device memory, e.g. a workspace slot no kernel wrote) and synccheck (barrier
# misuse). Needs a GPU and compute-sanitizer (CUDA toolkit); builds fastnca._C_cuda in place
# first when it is missing (for sm_90 only unless FASTNCA_CUDA_ARCHS says otherwise). The
# caching allocator is off so memcheck sees every tensor's own bounds.
# Usage: scripts/sanitize_cuda.sh [tool ...]   (default: memcheck racecheck initcheck synccheck)
#        SANITIZE_BACKEND=triton runs the Triton kernels instead (compiled inside the run).
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizer=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [[ -z "$sanitizer" && -n "$dir" && -x "$dir/bin/compute-sanitizer" ]]; then sanitizer="$dir/bin/compute-sanitizer"; fi
done
if [[ -z "$sanitizer" ]]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >&2
  exit 2
fi
py=$(command -v python3 || command -v python)
if ! ls python/fastnca/_C_cuda*.so >/dev/null 2>&1; then
  PATH="$(dirname "$py"):$PATH" FASTNCA_CUDA=on FASTNCA_CUDA_ARCHS="${FASTNCA_CUDA_ARCHS:-90}" \
    JOBS="${JOBS:-8}" scripts/build_inplace.sh build/sanitize
fi
tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(memcheck racecheck initcheck synccheck)
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in "${tools[@]}"; do
  extra=()
  quick=()
  case "$tool" in
    racecheck) extra=(--racecheck-report all); quick=(--quick) ;;
    initcheck) extra=(--track-unused-memory no) ;;
  esac
  echo "=== compute-sanitizer --tool $tool"
  if ! "$sanitizer" --tool "$tool" --error-exitcode 99 "${extra[@]}" "$py" scripts/cuda_sanitize_driver.py "${quick[@]}" \
       --backend "${SANITIZE_BACKEND:-cuda}"; then
    echo "=== $tool FAILED" >&2
    status=1
  fi
done
exit $status
