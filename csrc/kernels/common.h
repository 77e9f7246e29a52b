// Small helpers shared by the CPU and CUDA kernels. Framework-free: raw pointers and sizes only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LRAG_HD __host__ __device__ __forceinline__
#else
#define LRAG_HD inline
#endif

namespace lrag {

// Integer ceil(a / b) for positive b.
template <typename T>
LRAG_HD T ceil_div(T a, T b) { return (a + b - 1) / b; }

}  // namespace lrag
