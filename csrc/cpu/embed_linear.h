// The common tail of the CPU embedder kernels: out[n] = normalize(W @ in[n] + b), float32 accumulation.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/embed.h"

namespace lrag {

template <typename T>
float dot_row(const T* w, const float* v, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(w[i]) * v[i];
  return acc;
}

// in: [n, k] float32; weight: [d, k] row-major T; bias: [d] T; out: [n, d] float32 unit rows.
template <typename T>
void linear_l2norm_rows(const float* in, const T* weight, const T* bias, int64_t n, int64_t k, int64_t d,
                        float* out) {
  at::parallel_for(0, n * d, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / d, j = r % d;
      out[r] = static_cast<float>(bias[j]) + dot_row(weight + j * k, in + i * k, k);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    float* row = out + i * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(row[j]) * row[j];
    const float inv = 1.0f / std::max(static_cast<float>(std::sqrt(ss)), kNormalizeEps);
    for (int64_t j = 0; j < d; ++j) row[j] *= inv;
  }
}

}  // namespace lrag
