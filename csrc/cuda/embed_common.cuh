// Device helpers shared by the CUDA kernels of embed_head and pooled_embed: reductions and the common tail
// (Linear -> L2-normalise of one frame's pooled features, by one thread block).
#pragma once

#include "cuda/runtime.cuh"
#include "kernels/embed.h"

namespace lrag {

constexpr int kEmbedThreads = 512;  // 16 warps per block; one block embeds one frame
// Floats of the 48 KiB of dynamic shared memory left for a frame's features and output (32 are block_sum's).
constexpr int64_t kEmbedSmemFloats = 48 * 1024 / 4 - 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

// out[d] = normalize(weight[d, :k] . feats[:k] + bias[d]) for one frame. feats (k floats) and zs (d floats)
// live in shared memory; feats must be complete (the caller synchronises before the call).
template <typename T>
__device__ void linear_l2norm_block(const float* feats, const T* __restrict__ weight, const T* __restrict__ bias,
                                    int64_t k, int64_t d, float* zs, float* scratch, float* __restrict__ out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t j = warp; j < d; j += warps) {  // one warp per output row: coalesced reads of the weight row
    const T* row = weight + j * k;
    float acc = 0.f;
    for (int64_t i = lane; i < k; i += 32) acc += to_f(row[i]) * feats[i];
    acc = warp_sum(acc);
    if (lane == 0) zs[j] = acc + to_f(bias[j]);
  }
  __syncthreads();
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += zs[j] * zs[j];
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / fmaxf(sqrtf(ss), kNormalizeEps);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[j] = zs[j] * inv;
}

}  // namespace lrag
