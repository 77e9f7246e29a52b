// CPU kernel of lrag_ext::pooled_embed: adaptive-average-pool each frame to grid x grid -> Linear -> L2-normalise.
//
// Phase 1, parallel over (frame, channel) planes, one read of the plane: each row is summed into per-column-bin
// partial sums, which are added to every row bin containing that row (adaptive bins may overlap by one row or
// column when grid does not divide H or W). Phase 2: linear_l2norm_rows on the [N, C * grid * grid] features.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "embed_common.h"
#include "cpu/embed_linear.h"
#include "kernels/embed.h"

namespace lrag {
namespace {

LRAG_EMBED_MULTIVERSION static float sum_contiguous(const float* v, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// Sum of row[w * stride] for w in [w0, w1); the dense float32 case is vectorised.
template <typename T>
inline float range_sum(const T* row, int64_t stride, int64_t w0, int64_t w1) {
  if constexpr (std::is_same<T, float>::value) {
    if (stride == 1) return sum_contiguous(row + w0, w1 - w0);
  }
  float s = 0.f;
  for (int64_t w = w0; w < w1; ++w) s += static_cast<float>(row[w * stride]);
  return s;
}

template <typename T>
void pooled_embed_kernel(const PooledEmbedGeometry& g, const T* x, const int64_t* st, const T* w, const T* b,
                         float* out) {
  const int64_t G = g.grid, cells = G * G;
  std::vector<float> feats(static_cast<size_t>(g.n * g.k));
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(static_cast<size_t>(cells)), rowsum(static_cast<size_t>(G));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.c, c = t % g.c;
      const T* plane = x + n * st[0] + c * st[1];
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t h = 0; h < g.h; ++h) {
        const T* row = plane + h * st[2];
        for (int64_t j = 0; j < G; ++j) {
          const int64_t w0 = bin_start(j, g.w, G), w1 = bin_end(j, g.w, G);
          rowsum[j] = range_sum(row, st[3], w0, w1);
        }
        // Row bins containing h: i from floor(h * G / H) while bin_start(i) <= h (at most two).
        for (int64_t i = (h * G) / g.h; i < G && bin_start(i, g.h, G) <= h; ++i) {
          if (h >= bin_end(i, g.h, G)) continue;
          for (int64_t j = 0; j < G; ++j) acc[i * G + j] += rowsum[j];
        }
      }
      float* f = feats.data() + n * g.k + c * cells;
      for (int64_t i = 0; i < G; ++i) {
        const int64_t rows = bin_end(i, g.h, G) - bin_start(i, g.h, G);
        for (int64_t j = 0; j < G; ++j) {
          const int64_t cols = bin_end(j, g.w, G) - bin_start(j, g.w, G);
          f[i * G + j] = static_cast<float>(acc[i * G + j] / static_cast<double>(rows * cols));
        }
      }
    }
  });
  linear_l2norm_rows(feats.data(), w, b, g.n, g.k, g.d, out);
}

at::Tensor pooled_embed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t grid) {
  const PooledEmbedGeometry g = check_pooled_embed_args(x, weight, bias, grid);
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  at::Tensor out = at::empty({g.n, g.d}, x.options().dtype(at::kFloat));
  if (g.n == 0) return out;
  const int64_t st[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  LRAG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pooled_embed_cpu", [&] {
    pooled_embed_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), st, wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                                  out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrag_ext, CPU, m) { m.impl("pooled_embed", &pooled_embed_cpu); }

}  // namespace lrag
