// CUDA kernel of lrag_ext::pooled_embed: adaptive-average-pool to grid x grid -> Linear -> L2-normalise.
//
// One thread block per frame, one launch. Each warp sums whole cells (channel c, row bin i, column bin j) of
// the adaptive_avg_pool2d bins of csrc/kernels/embed.h into shared memory (every value is read once when grid
// divides H and W; overlapping bins re-read their shared row/column), then linear_l2norm_block, as the CPU
// kernel does. Any input strides are read in place.
#include "cuda/embed_common.cuh"
#include "cuda/runtime.cuh"
#include "embed_common.h"

namespace lrag {
namespace {

template <typename T>
__global__ void pooled_embed_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                                    int64_t C, int64_t H, int64_t W, int64_t G, const T* __restrict__ weight,
                                    const T* __restrict__ bias, int64_t D, float* __restrict__ out) {
  float* smem = dynamic_smem<float>();
  const int64_t K = C * G * G;
  float* feats = smem;        // [K]
  float* zs = smem + K;       // [D]
  float* scratch = zs + D;    // [32]
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t cell = warp; cell < K; cell += warps) {
    const int64_t c = cell / (G * G), i = (cell / G) % G, j = cell % G;
    const int64_t h0 = bin_start(i, H, G), h1 = bin_end(i, H, G), w0 = bin_start(j, W, G), w1 = bin_end(j, W, G);
    const int64_t cols = w1 - w0, count = (h1 - h0) * cols;
    const T* base = x + n * s0 + c * s1 + h0 * s2 + w0 * s3;
    float acc = 0.f;
    for (int64_t e = lane; e < count; e += 32) acc += to_f(base[(e / cols) * s2 + (e % cols) * s3]);
    acc = warp_sum(acc);
    if (lane == 0) feats[cell] = acc / static_cast<float>(count);
  }
  __syncthreads();
  linear_l2norm_block(feats, weight, bias, K, D, zs, scratch, out + n * D);
}

at::Tensor pooled_embed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t grid) {
  const PooledEmbedGeometry g = check_pooled_embed_args(x, weight, bias, grid);
  // Before any copy of the parameters; compared without adding or multiplying: D of an (expanded) weight may be
  // near 2^63. An empty batch launches nothing.
  TORCH_CHECK(g.n == 0 || (g.k <= kEmbedSmemFloats && g.d <= kEmbedSmemFloats - g.k),
              "pooled_embed on CUDA needs C * grid * grid + D <= ", kEmbedSmemFloats, ", got ", g.k, " + ", g.d);
  const gpu::DeviceGuard guard(x.device());
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  at::Tensor out = at::empty({g.n, g.d}, x.options().dtype(at::kFloat));
  if (g.n == 0) return out;
  const size_t smem = static_cast<size_t>(g.k + g.d + 32) * sizeof(float);
  TORCH_CHECK(g.n <= 2147483647, "pooled_embed on CUDA takes at most 2^31 - 1 frames per call, got ", g.n);
  const cudaStream_t stream = gpu::current_stream();
  LRAG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pooled_embed_cuda", [&] {
    auto* kernel = pooled_embed_kernel<scalar_t>;
    LRAG_LAUNCH(kernel, static_cast<unsigned>(g.n), kEmbedThreads, smem, stream)(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3), g.c, g.h, g.w, g.grid,
        wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), g.d, out.data_ptr<float>());
    gpu::check_launch();
  });
  return out;
}

}  // namespace

LRAG_CUDA_IMPL(m) { m.impl("pooled_embed", &pooled_embed_cuda); }

}  // namespace lrag
