// CUDA kernel of lrag_ext::embed_head: GroupNorm -> SiLU -> global average pool -> Linear -> L2-normalise.
//
// One thread block per frame, one launch. Mirrors csrc/cpu/embed_head.cpp: per group (one warp each) three
// passes over the group's values, which stay in L2 (the mean, the centred variance, then the per-channel mean
// of silu(rstd * weight * (x - mean) + bias)) into shared memory; then linear_l2norm_block. NCHW and
// channels-last features are read in place through (sn, sc, sp) strides.
#include "cuda/embed_common.cuh"
#include "cuda/runtime.cuh"
#include "embed_common.h"

namespace lrag {
namespace {

template <typename T>
__global__ void embed_head_kernel(const T* __restrict__ x, int64_t sn, int64_t sc, int64_t sp, int64_t C,
                                  int64_t P, int64_t groups, const T* __restrict__ gn_w,
                                  const T* __restrict__ gn_b, const T* __restrict__ fc_w,
                                  const T* __restrict__ fc_b, int64_t D, float eps, float* __restrict__ out) {
  float* smem = dynamic_smem<float>();
  float* pooled = smem;          // [C]
  float* zs = smem + C;          // [D]
  float* scratch = zs + D;       // [32]
  const int64_t n = blockIdx.x;
  const T* frame = x + n * sn;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t cg = C / groups, count = cg * P;
  const bool cl = sc == 1;  // channels-last: walk pixel-major so that a warp reads adjacent channels

  for (int64_t g = warp; g < groups; g += warps) {
    const int64_t c0 = g * cg;
    // Element e of the group -> (local channel, pixel), in the memory-friendly order of the layout.
    auto value = [&](int64_t e, int64_t* c) {
      const int64_t cc = cl ? e % cg : e / P, p = cl ? e / cg : e % P;
      *c = cc;
      return to_f(frame[(c0 + cc) * sc + p * sp]);
    };
    int64_t c;
    float s = 0.f;
    for (int64_t e = lane; e < count; e += 32) s += value(e, &c);
    const float mean = warp_sum(s) / static_cast<float>(count);
    float q = 0.f;
    for (int64_t e = lane; e < count; e += 32) {
      const float dv = value(e, &c) - mean;
      q += dv * dv;
    }
    const float rstd = rsqrtf(warp_sum(q) / static_cast<float>(count) + eps);
    for (int64_t cc = 0; cc < cg; ++cc) {
      const float a = rstd * to_f(gn_w[c0 + cc]), b = to_f(gn_b[c0 + cc]);
      const T* plane = frame + (c0 + cc) * sc;
      float acc = 0.f;
      for (int64_t p = lane; p < P; p += 32) acc += silu(a * (to_f(plane[p * sp]) - mean) + b);
      acc = warp_sum(acc);
      if (lane == 0) pooled[c0 + cc] = acc / static_cast<float>(P);
    }
  }
  __syncthreads();
  linear_l2norm_block(pooled, fc_w, fc_b, C, D, zs, scratch, out + n * D);
}

at::Tensor embed_head_cuda(const at::Tensor& feat, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                           const at::Tensor& fc_weight, const at::Tensor& fc_bias, int64_t groups, double eps) {
  const EmbedHeadGeometry g = check_embed_head_args(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps);
  // Before any copy of the parameters; compared without adding or multiplying: C and D of (expanded) parameters
  // may be near 2^63. An empty batch launches nothing.
  TORCH_CHECK(g.n == 0 || (g.c <= kEmbedSmemFloats && g.d <= kEmbedSmemFloats - g.c),
              "embed_head on CUDA needs C + D <= ", kEmbedSmemFloats, ", got C = ", g.c, ", D = ", g.d);
  const gpu::DeviceGuard guard(feat.device());
  const PixelView v = pixel_view(feat);
  const at::Tensor gw = gn_weight.contiguous(), gb = gn_bias.contiguous();
  const at::Tensor fw = fc_weight.contiguous(), fb = fc_bias.contiguous();
  at::Tensor out = at::empty({g.n, g.d}, feat.options().dtype(at::kFloat));
  if (g.n == 0) return out;
  const size_t smem = static_cast<size_t>(g.c + g.d + 32) * sizeof(float);
  TORCH_CHECK(g.n <= 2147483647, "embed_head on CUDA takes at most 2^31 - 1 frames per call, got ", g.n);
  const cudaStream_t stream = gpu::current_stream();
  LRAG_DISPATCH_FLOAT_TYPES(feat.scalar_type(), "embed_head_cuda", [&] {
    auto* kernel = embed_head_kernel<scalar_t>;
    LRAG_LAUNCH(kernel, static_cast<unsigned>(g.n), kEmbedThreads, smem, stream)(
        v.t.data_ptr<scalar_t>(), v.sn, v.sc, v.sp, g.c, g.pixels, g.groups, gw.data_ptr<scalar_t>(),
        gb.data_ptr<scalar_t>(), fw.data_ptr<scalar_t>(), fb.data_ptr<scalar_t>(), g.d, static_cast<float>(eps),
        out.data_ptr<float>());
    gpu::check_launch();
  });
  return out;
}

}  // namespace

LRAG_CUDA_IMPL(m) { m.impl("embed_head", &embed_head_cuda); }

}  // namespace lrag
