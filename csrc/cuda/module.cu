// fastnca._C_cuda: the CUDA kernels. Kernels run on the stream Python passes
// (torch.cuda.current_stream().cuda_stream) and on the device current in torch.
#include "fastnca/bindings.h"
#include <cuda_runtime.h>

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastnca CUDA kernels";
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    return n;
  });
  m.def("cuda_runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  for (auto& bind : fastnca::binders()) bind(m);
}
