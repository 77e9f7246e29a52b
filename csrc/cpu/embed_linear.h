// The common tail of the CPU embedder kernels: out[n] = normalize(W @ in[n] + b), float32 accumulation.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/embed.h"

namespace lrag {

// AVX2+FMA or baseline, chosen at load time. (AVX-512 is left out: on the short rows of these kernels its
// scalar remainder made it slower than AVX2 on the machines we measured.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LRAG_EMBED_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LRAG_EMBED_MULTIVERSION
#endif

// Four rows of w (row stride ld) against one vector: four independent accumulators, so the loop is bound by
// FMA throughput rather than by the latency of a single reduction chain.
LRAG_EMBED_MULTIVERSION static void dot4_f32(const float* w, int64_t ld, const float* v, int64_t k, float* out) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  const float *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < k; ++i) {
    a0 += w0[i] * v[i];
    a1 += w1[i] * v[i];
    a2 += w2[i] * v[i];
    a3 += w3[i] * v[i];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

LRAG_EMBED_MULTIVERSION static float dot_f32(const float* w, const float* v, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += w[i] * v[i];
  return acc;
}

// rows [j0, j1) of (w @ v): float32 weights in place; other dtypes are widened four rows at a time first.
template <typename T>
void matvec_rows(const T* w, const float* v, int64_t k, int64_t j0, int64_t j1, float* out) {
  std::vector<float> wide;
  if (!std::is_same<T, float>::value) wide.resize(static_cast<size_t>(4 * k));
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t m = std::min<int64_t>(4, j1 - j);
    const float* rows;
    if constexpr (std::is_same<T, float>::value) {
      rows = w + j * k;
    } else {
      for (int64_t i = 0; i < m * k; ++i) wide[i] = static_cast<float>(w[j * k + i]);
      rows = wide.data();
    }
    if (m == 4) {
      dot4_f32(rows, k, v, k, out + j);
    } else {
      for (int64_t r = 0; r < m; ++r) out[j + r] = dot_f32(rows + r * k, v, k);
    }
  }
}

// in: [n, k] float32; weight: [d, k] row-major T; bias: [d] T; out: [n, d] float32 unit rows.
template <typename T>
void linear_l2norm_rows(const float* in, const T* weight, const T* bias, int64_t n, int64_t k, int64_t d,
                        float* out) {
  // Tasks of 64 output rows of one frame: enough work per task, and every thread gets some for D >= 128.
  constexpr int64_t kRows = 64;
  const int64_t chunks = ceil_div<int64_t>(d, kRows);
  at::parallel_for(0, n * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / chunks, j0 = (t % chunks) * kRows, j1 = std::min(d, j0 + kRows);
      float* row = out + i * d;
      matvec_rows(weight, in + i * k, k, j0, j1, row);
      for (int64_t j = j0; j < j1; ++j) row[j] += static_cast<float>(bias[j]);
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
