#!/usr/bin/env bash
# Test-only build: compile the CUDA kernel sources (csrc/cuda/fire_mask.cu, nca_step.cu,
# neighborhood_attention.cu) with the host C++ compiler against the emulation
# layer in csrc/include/fastnca/emulation_cuda.cuh, into the Python extension
# fastnca_cuda_emu (same functions as fastnca._C_cuda, operating on CPU pointers).
# tests/test_cuda_kernels.py then runs the CUDA launchers on CPU tensors through it, which
# checks the kernels' logic on machines without a GPU. Needs the CUDA headers (nvcc's
# toolkit) for cuda_fp16.h / cuda_bf16.h / cuda_runtime.h; nothing CUDA is linked.
# Usage: scripts/build_cuda_emulation.sh [out-dir]   (default build/cuda-emu)
#   EMU_DEFINES: extra compiler and link flags (e.g. -DFASTNCA_TEST_TILE_FACTOR=8: nca tiles of 8x
#   the cells one pass holds, so that the backward's multi-pass tiles run in tests);
#   EMU_SOURCES: the kernel files to build (default: fire_mask nca_step neighborhood_attention).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/cuda-emu}
mkdir -p "$out"
# nvcc may be a wrapper script: ask it where its toolkit lives.
cuda_home=${CUDA_HOME:-$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n "s/^#\$ TOP=//p" | head -1)}
cuda_home=${cuda_home:-/usr/local/cuda}
py=$(command -v python)
ext=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cat > "$out/emu_module.cpp" <<'CPP'
#include "fastnca/bindings.h"
#include "fastnca/emulation_cuda.cuh"
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;
PYBIND11_MODULE(fastnca_cuda_emu, m) {
  m.doc() = "fastnca CUDA kernels compiled for host emulation (tests only)";
  for (auto& bind : fastnca::binders()) bind(m);
  m.def("set_smem_poison", [](uint32_t bits) { fastnca_emu::smem_poison = bits; },
        "the word that fills shared memory at each block's launch (default 0x7FC00000, a NaN)");
}
CPP
flags=(-std=c++17 -O1 -g0 -fPIC -shared -pthread -DFASTNCA_CUDA_EMULATION -Wno-attributes
       -Icsrc/include -I"$cuda_home/include" $("$py" -m pybind11 --includes) ${EMU_DEFINES:-})
objs=()
srcs=("$out/emu_module.cpp")
for name in ${EMU_SOURCES:-fire_mask nca_step neighborhood_attention}; do srcs+=("csrc/cuda/$name.cu"); done
for src in "${srcs[@]}"; do
  obj="$out/$(basename "$src").o"
  ${CXX:-g++} "${flags[@]}" -x c++ -c "$src" -o "$obj" &
  objs+=("$obj")
done
wait
${CXX:-g++} -shared -pthread ${EMU_DEFINES:-} "${objs[@]}" -o "$out/fastnca_cuda_emu$ext"
echo "$out/fastnca_cuda_emu$ext"
