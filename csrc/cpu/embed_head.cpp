// CPU kernel of lrag_ext::embed_head: GroupNorm -> SiLU -> global average pool -> Linear -> L2-normalise.
//
// Phase 1, parallel over (frame, group): the group's values are gathered once into a float buffer of
// channel planes (converting the dtype and the layout), then three vectorised passes over it (in cache): the
// mean, the centred variance (two-pass, like torch), then the per-channel mean of silu(a * (x - mean) + b) with
// the GroupNorm as a per-channel scale a = rstd * weight and shift b = bias. No normalised map is written.
// Phase 2: the [N, C] pooled features go through linear_l2norm_rows (Linear + L2-normalise).
// NCHW and channels-last inputs are read in place (see PixelView).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "embed_common.h"
#include "cpu/embed_linear.h"
#include "kernels/embed.h"

namespace lrag {
namespace {

// exp(z) for z <= 0 within ~2 ulp (Cephes expf: z = n ln2 + r, degree-6 polynomial in r, times 2^n built from
// the exponent bits). Branch-free, so the loops below vectorise (libm's expf does not, and dominated the kernel):
// z is clamped at -87 in the integer domain, and n is rounded with the 1.5 * 2^23 trick instead of floor.
inline float exp_nonpos(float z) {
  int32_t zb;
  std::memcpy(&zb, &z, sizeof(zb));
  constexpr int32_t kMinus87 = -1028784128;  // bits of -87.0f; for negative floats a larger int is a smaller |z|
  zb = zb < kMinus87 ? zb : kMinus87;
  std::memcpy(&z, &zb, sizeof(z));
  const float n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = z - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// silu(y) = y * sigmoid(y) with t = exp(-|y|) <= 1 (never overflows): sigmoid = (y >= 0 ? 1 : t) / (1 + t),
// the select written as arithmetic on copysign(1, y). Relative error ~2e-7.
inline float silu_fast(float y) {
  const float t = exp_nonpos(-std::fabs(y));
  const float sgn = std::copysign(1.0f, y);
  return y * (0.5f * (1.0f + sgn) + 0.5f * (1.0f - sgn) * t) / (1.0f + t);
}

// Sum of v[0, n) and sum of (v - mean)^2, vectorised float partial sums.
LRAG_EMBED_MULTIVERSION static float sum_f32(const float* v, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

LRAG_EMBED_MULTIVERSION static float centred_sq_f32(const float* v, int64_t n, float mean) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  return s;
}

// sum_i silu(a * (v[i] - mean) + b)
LRAG_EMBED_MULTIVERSION static float silu_sum_f32(const float* v, int64_t n, float a, float mean, float b) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += silu_fast(a * (v[i] - mean) + b);
  }
  return s;
}

// Copies channels [c0, c0 + cg) of one frame into buf as cg contiguous float planes of v.pixels values.
template <typename T>
void gather_group(const T* frame, const PixelView& v, int64_t c0, int64_t cg, float* buf) {
  if (v.sc == 1) {  // channels-last: a group's channels are adjacent within each pixel
    for (int64_t p = 0; p < v.pixels; ++p) {
      const T* px = frame + p * v.sp + c0;
      for (int64_t c = 0; c < cg; ++c) buf[c * v.pixels + p] = static_cast<float>(px[c]);
    }
  } else {
    for (int64_t c = 0; c < cg; ++c) {
      const T* plane = frame + (c0 + c) * v.sc;
      float* dst = buf + c * v.pixels;
      for (int64_t p = 0; p < v.pixels; ++p) dst[p] = static_cast<float>(plane[p * v.sp]);
    }
  }
}

template <typename T>
void embed_head_kernel(const PixelView& v, const EmbedHeadGeometry& g, const T* x, const T* gn_w, const T* gn_b,
                       const T* fc_w, const T* fc_b, double eps, float* out) {
  const int64_t cg = g.c / g.groups, P = v.pixels;
  std::vector<float> pooled(static_cast<size_t>(g.n * g.c));
  at::parallel_for(0, g.n * g.groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(static_cast<size_t>(cg * P));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.groups, c0 = (t % g.groups) * cg;
      gather_group(x + n * v.sn, v, c0, cg, buf.data());
      const double count = static_cast<double>(cg * P);
      double sum = 0;  // per-plane float partial sums, combined in double
      for (int64_t c = 0; c < cg; ++c) sum += sum_f32(buf.data() + c * P, P);
      const float mean = static_cast<float>(sum / count);
      double sq = 0;
      for (int64_t c = 0; c < cg; ++c) sq += centred_sq_f32(buf.data() + c * P, P, mean);
      const double rstd = 1.0 / std::sqrt(sq / count + eps);
      // y = a * (x - mean) + b. Centring first (rather than folding the mean into b) avoids cancellation
      // when |mean| * rstd is large.
      for (int64_t c = 0; c < cg; ++c) {
        const float a = static_cast<float>(rstd * static_cast<float>(gn_w[c0 + c]));
        const float b = static_cast<float>(gn_b[c0 + c]);
        pooled[n * g.c + c0 + c] = silu_sum_f32(buf.data() + c * P, P, a, mean, b) / static_cast<float>(P);
      }
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
