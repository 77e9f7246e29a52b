// Argument checks shared by the CPU and CUDA hosts of every op. Every message names the argument and
// what was expected, so a user can fix the call without reading the kernel.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

namespace lrag {

// torch's spelling of a dtype ("float32", "int64"), the one users write.
inline std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

inline std::string dtype_list(std::initializer_list<at::ScalarType> types) {
  std::string out;
  for (auto t : types) {
    if (!out.empty()) out += ", ";
    out += dtype_name(t);
  }
  return out;
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor ", shape, ", got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, name, " must have dtype ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype_name(s));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t want, const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == want, name, ".shape[", dim, "] must equal ", what, " (", want, "), got ",
              t.size(dim));
}

}  // namespace lrag

// Dispatch over the three activation dtypes the ops accept (float32, float16, bfloat16).
#define LRAG_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
