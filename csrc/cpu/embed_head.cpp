// CPU kernel of lrag_ext::embed_head: GroupNorm -> SiLU -> global average pool -> Linear -> L2-normalise.
//
// Phase 1, parallel over (frame, group): three passes over the group's values (which stay in cache): the
// mean, the centred variance (two-pass, like torch), then the per-channel mean of silu(a * (x - mean) + b) with the
// GroupNorm as a per-channel scale a = rstd * weight and shift b = bias. No normalised tensor is ever written.
// Phase 2: the [N, C] pooled features go through linear_l2norm_rows (Linear + L2-normalise).
// NCHW and channels-last inputs are read in place (see PixelView).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "embed_common.h"
#include "cpu/embed_linear.h"
#include "kernels/embed.h"

namespace lrag {
namespace {

// Calls f(local_channel, value) for every value of channels [c0, c0 + cg) of one frame, in memory order.
template <typename T, typename F>
inline void for_group(const T* frame, const PixelView& v, int64_t c0, int64_t cg, F&& f) {
  if (v.sc == 1) {  // channels-last: a group's channels are adjacent within each pixel
    for (int64_t p = 0; p < v.pixels; ++p) {
      const T* px = frame + p * v.sp + c0;
      for (int64_t c = 0; c < cg; ++c) f(c, static_cast<float>(px[c]));
    }
  } else {
    for (int64_t c = 0; c < cg; ++c) {
      const T* plane = frame + (c0 + c) * v.sc;
      for (int64_t p = 0; p < v.pixels; ++p) f(c, static_cast<float>(plane[p * v.sp]));
    }
  }
}

template <typename T>
void embed_head_kernel(const PixelView& v, const EmbedHeadGeometry& g, const T* x, const T* gn_w, const T* gn_b,
                       const T* fc_w, const T* fc_b, double eps, float* out) {
  const int64_t cg = g.c / g.groups;
  std::vector<float> pooled(static_cast<size_t>(g.n * g.c));
  at::parallel_for(0, g.n * g.groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(static_cast<size_t>(cg));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.groups, c0 = (t % g.groups) * cg;
      const T* frame = x + n * v.sn;
      const double count = static_cast<double>(cg * v.pixels);
      double sum = 0;
      for_group(frame, v, c0, cg, [&](int64_t, float val) { sum += val; });
      const double mean = sum / count;
      double sq = 0;
      for_group(frame, v, c0, cg, [&](int64_t, float val) { sq += (val - mean) * (val - mean); });
      const double rstd = 1.0 / std::sqrt(sq / count + eps);
      // y = a * (x - mean) + b. Centring first (rather than folding the mean into b) avoids cancellation
      // when |mean| * rstd is large.
      std::vector<float> a(cg), b(cg);
      const float m = static_cast<float>(mean);
      for (int64_t c = 0; c < cg; ++c) {
        a[c] = static_cast<float>(rstd * static_cast<float>(gn_w[c0 + c]));
        b[c] = static_cast<float>(gn_b[c0 + c]);
        acc[c] = 0;
      }
      for_group(frame, v, c0, cg, [&](int64_t c, float val) { acc[c] += silu(a[c] * (val - m) + b[c]); });
      for (int64_t c = 0; c < cg; ++c) pooled[n * g.c + c0 + c] = static_cast<float>(acc[c] / v.pixels);
    }
  });
  linear_l2norm_rows(pooled.data(), fc_w, fc_b, g.n, g.c, g.d, out);
}

at::Tensor embed_head_cpu(const at::Tensor& feat, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                          const at::Tensor& fc_weight, const at::Tensor& fc_bias, int64_t groups, double eps) {
  const EmbedHeadGeometry g = check_embed_head_args(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps);
  const PixelView v = pixel_view(feat);
  const at::Tensor gw = gn_weight.contiguous(), gb = gn_bias.contiguous();
  const at::Tensor fw = fc_weight.contiguous(), fb = fc_bias.contiguous();
  at::Tensor out = at::empty({g.n, g.d}, feat.options().dtype(at::kFloat));
  if (g.n == 0) return out;
  LRAG_DISPATCH_FLOAT_TYPES(feat.scalar_type(), "embed_head_cpu", [&] {
    embed_head_kernel<scalar_t>(v, g, v.t.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
                                fw.data_ptr<scalar_t>(), fb.data_ptr<scalar_t>(), eps, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrag_ext, CPU, m) { m.impl("embed_head", &embed_head_cpu); }

}  // namespace lrag
