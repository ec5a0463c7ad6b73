// Each kernel source registers its own Python bindings, so adding an op touches only
// its own file (CMake globs csrc/cpu/*.cpp and csrc/cuda/*.cu).
//
// Calling convention (the modules do not link libtorch): Python passes data pointers
// as integers (tensor.data_ptr()), sizes and strides in elements, a dtype code
// (common.h), and for CUDA the stream handle (torch.cuda.current_stream().cuda_stream).
// The Python launchers in fastnca/backends/ check every assumption a kernel states.
#pragma once
#include <pybind11/pybind11.h>
#include <functional>
#include <vector>
#include <cstdint>

namespace fastnca {

using Binder = std::function<void(pybind11::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> list;
  return list;
}

struct RegisterBindings {
  explicit RegisterBindings(Binder b) { binders().push_back(std::move(b)); }
};

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace fastnca

#define FASTNCA_CAT_(a, b) a##b
#define FASTNCA_CAT(a, b) FASTNCA_CAT_(a, b)
// FASTNCA_BINDINGS(m) { m.def(...); }  -- once per source file.
#define FASTNCA_BINDINGS(m)                                                         \
  static void FASTNCA_CAT(fastnca_bind_, __LINE__)(pybind11::module_ & m);          \
  static ::fastnca::RegisterBindings FASTNCA_CAT(fastnca_reg_, __LINE__)(           \
      FASTNCA_CAT(fastnca_bind_, __LINE__));                                        \
  static void FASTNCA_CAT(fastnca_bind_, __LINE__)(pybind11::module_ & m)
