// Argument checks shared by the CPU and CUDA hosts of every op. Every message names the argument and
// what was expected, so a user can fix the call without reading the kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
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

// The product of non-negative sizes, or -1 when it does not fit in int64. Size arithmetic on user-chosen sizes
// goes through this (or compares without multiplying), so that no check can be passed by a wrapped product.
inline int64_t size_product(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s == 0) return 0;
  }
  int64_t p = 1;
  for (int64_t s : sizes) {
    if (s < 0 || p > std::numeric_limits<int64_t>::max() / s) return -1;
    p *= s;
  }
  return p;
}

// Whether two tensors may share an element, by torch's rule (at::get_overlap_status: full or partial overlap),
// plus the case torch calls "too hard" (views that are not dense) where the answer is still certain: two
// non-empty views of one storage that start at the same address share their first element.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial:
      return true;
    case at::MemOverlapStatus::TooHard:
      return a.numel() > 0 && b.numel() > 0 && a.storage().is_alias_of(b.storage()) &&
             a.const_data_ptr() == b.const_data_ptr();
    default:
      return false;
  }
}

// An output written by an op must have one address per element: a stride-0 dim (expand()) would be written
// several times, the last writer winning. Refused as torch's in-place ops refuse it (at::has_internal_overlap:
// stride 0 is detected; other self-overlapping strides are "too hard" for torch and pass, as they do there).
inline void check_no_internal_overlap(const at::Tensor& out, const char* name) {
  // An empty output is never written, whatever its strides.
  TORCH_CHECK(out.numel() == 0 || at::has_internal_overlap(out) != at::MemOverlap::Yes, name,
              " has elements that share memory (a stride-0 dim, e.g. from expand()): an output needs one address "
              "per element; pass a .contiguous() or .clone() tensor, got strides ", out.strides(), " for shape ",
              out.sizes());
}

// An output must not share memory with another argument (an input, or another output): the op would read
// values it already overwrote, or write one element twice. `out` and `other` are named in the message.
inline void check_no_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& other,
                             const char* other_name) {
  TORCH_CHECK(!shares_memory(out, other), out_name, " overlaps ", other_name,
              " in memory: an output must not share memory with another argument; pass separate tensors "
              "(e.g. ", other_name, ".clone())");
}

}  // namespace lrag

// Dispatch over the three activation dtypes the ops accept (float32, float16, bfloat16).
#define LRAG_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
