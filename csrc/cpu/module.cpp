// fastnca._C: the C++ CPU kernels. Each source file registers its functions through
// FASTNCA_BINDINGS (bindings.h); this file only creates the module.
#include "fastnca/bindings.h"
#ifdef FASTNCA_OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnca C++ CPU kernels";
#ifdef FASTNCA_OPENMP
  m.attr("openmp") = true;
  m.def("max_threads", [] { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("max_threads", [] { return 1; });
#endif
  for (auto& bind : fastnca::binders()) bind(m);
}
