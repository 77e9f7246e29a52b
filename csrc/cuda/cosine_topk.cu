// CUDA kernels of lrag_ext::cosine_topk. Same algorithm as csrc/cpu/cosine_topk.cpp, two launches:
//
// 1. score_chunks: grid (chunks, B). Each block owns `chunk` consecutive logical ids of one stream, scores the
//    eligible ones (a group of `tpe` threads per entry, 16-byte loads when aligned, shuffle reduction), packs
//    (score, id) into the ranking keys of kernels/topk_key.h in shared memory, bitonic-sorts them and writes
//    its best `keep` keys to a partial buffer. The grid covers the whole addressable range of each stream
//    (known on the host from page_table's shape), so no device value is ever read on the host; blocks past
//    hi[b] just write empty keys. A batch-1 query is spread over at least ~2 blocks per SM.
// 2. merge_partials: one block per stream folds the partial lists into its top-k: the running top-k plus a
//    batch of partial keys are bitonic-sorted in shared memory, repeatedly, then decoded to (score, id).
// When k exceeds what one block can keep in shared memory (kMaxMergeK), stage 1 keeps whole chunks and the
// merge is torch.topk on the packed keys (exact on int64), then a decode kernel.
#include <algorithm>
#include <limits>
#include <tuple>

#include "cosine_topk_common.h"
#include "cuda/runtime.cuh"
#include "kernels/topk_key.h"

namespace lrag {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kMergeThreads = 512;
constexpr int64_t kMinChunk = 128;
constexpr int64_t kMaxChunk = 1024;
constexpr int64_t kMaxMergeBuffer = 4096;  // keys in the merge block's shared memory (32 KiB)
constexpr int64_t kMaxMergeK = kMaxMergeBuffer / 2;
constexpr int64_t kMaxDim = 8192;          // the query lives in shared memory as float32
// The score kernel's dynamic shared memory (keys + query) stays within the default 48 KiB.
static_assert(kMaxChunk * sizeof(uint64_t) + kMaxDim * sizeof(float) <= 48 * 1024, "score_chunks smem");
static_assert(kMaxMergeBuffer * sizeof(uint64_t) <= 48 * 1024, "merge_partials smem");

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Sorts keys[0, n) descending in shared memory; n is a power of two. All threads of the block must call it.
__device__ void bitonic_sort_desc(uint64_t* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));  // lower index of the t-th compared pair
        const int j = i + stride;
        const bool descending = (i & size) == 0;    // the final pass (size == n) is descending everywhere
        const uint64_t a = keys[i], b = keys[j];
        if (descending ? (a < b) : (a > b)) {
          keys[i] = b;
          keys[j] = a;
        }
      }
      __syncthreads();
    }
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// dot(q, e) and |e|^2 over this thread's share of the D dims (lane `lane` of a group of `tpe` threads).
template <typename T, bool kVec>
__device__ __forceinline__ void partial_dot(const float* q, const T* e, int64_t D, int lane, int tpe, float& dot,
                                            float& sumsq) {
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
    // An aligned aggregate of T, not a uint4 read back through a T*: that would break C++'s aliasing rules
    // (nvcc tolerates it; the host compiler of the emulated build reads garbage).
    struct alignas(16) Pack {
      T v[kPer];
    };
    for (int64_t d = static_cast<int64_t>(lane) * kPer; d < D; d += static_cast<int64_t>(tpe) * kPer) {
      const Pack pack = *reinterpret_cast<const Pack*>(e + d);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const float x = to_float(pack.v[i]);
        dot += q[d + i] * x;
        sumsq += x * x;
      }
    }
  } else {
    for (int64_t d = lane; d < D; d += tpe) {
      const float x = to_float(e[d]);
      dot += q[d] * x;
      sumsq += x * x;
    }
  }
}

template <typename T, bool kVec>
__global__ void score_chunks_kernel(const T* __restrict__ queries, const T* __restrict__ pages, int64_t page_stride,
                                    int64_t slot_stride, int64_t num_pages, int64_t page_size,
                                    const int32_t* __restrict__ table, int64_t max_pages,
                                    const int64_t* __restrict__ lo, const int64_t* __restrict__ hi, int64_t capacity,
                                    int64_t D, int chunk, int tpe, int keep, uint64_t* __restrict__ partial) {
  uint64_t* keys = dynamic_smem<uint64_t>();                       // [chunk]
  float* q = reinterpret_cast<float*>(keys + chunk);               // [D]
  __shared__ float warp_sums[kScoreThreads / 32];

  const int64_t b = blockIdx.y;
  const int64_t num_chunks = gridDim.x;
  uint64_t* out = partial + (b * num_chunks + blockIdx.x) * keep;

  // Clamp before adding the block's offset: lo may be anything up to INT64_MAX (values are never checked on
  // the host), and first + offset must not overflow. After the test, 0 <= first < last <= capacity < 2^31.
  const int64_t first = max(lo[b], int64_t{0});
  const int64_t last = min(hi[b], capacity);
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * chunk;
  if (first >= last || offset >= last - first) {  // uniform across the block
    for (int j = threadIdx.x; j < keep; j += blockDim.x) out[j] = kEmptyKey;
    return;
  }
  const int64_t start = first + offset;
  const int n = static_cast<int>(min(static_cast<int64_t>(chunk), last - start));

  // Query to shared memory (float32) and its norm.
  float local = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float x = to_float(queries[b * D + d]);
    q[d] = x;
    local += x * x;
  }
  for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(0xffffffffu, local, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = local;
  for (int j = threadIdx.x; j < chunk; j += blockDim.x) keys[j] = kEmptyKey;
  __syncthreads();
  float qsq = 0.f;
  for (int w = 0; w < kScoreThreads / 32; ++w) qsq += warp_sums[w];
  const float qden = sqrtf(qsq) + kCosineEps;

  // Groups of `tpe` lanes (aligned inside a warp) score one entry each. Every thread runs the same number of
  // iterations so the group shuffles always see all 32 lanes.
  const int group = threadIdx.x / tpe, lane = threadIdx.x % tpe, groups = kScoreThreads / tpe;
  for (int base = 0; base < n; base += groups) {
    const int j = base + group;
    const int64_t id = start + j;
    bool valid = j < n;
    float dot = 0.f, sumsq = 0.f;
    if (valid) {
      const int64_t page = table[b * max_pages + id / page_size];
      valid = page >= 0 && page < num_pages;  // out-of-pool pages are skipped, not read
      if (valid) partial_dot<T, kVec>(q, pages + page * page_stride + (id % page_size) * slot_stride, D, lane, tpe,
                                      dot, sumsq);
    }
    for (int off = tpe >> 1; off > 0; off >>= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
      sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
    }
    if (valid && lane == 0) keys[j] = make_key(dot / (qden * (sqrtf(sumsq) + kCosineEps)), id);
  }
  __syncthreads();
  bitonic_sort_desc(keys, chunk);
  for (int j = threadIdx.x; j < keep; j += blockDim.x) out[j] = keys[j];
}

__global__ void merge_partials_kernel(const uint64_t* __restrict__ partial, int64_t per_stream, int k_eff, int64_t k,
                                      int buffer, float* __restrict__ scores, int64_t* __restrict__ ids) {
  uint64_t* buf = dynamic_smem<uint64_t>();  // [buffer]: the running top-k in [0, k_eff), then a batch of candidates
  const int64_t b = blockIdx.x;
  const uint64_t* src = partial + b * per_stream;
  const int batch = buffer - k_eff;
  for (int j = threadIdx.x; j < k_eff; j += blockDim.x) buf[j] = kEmptyKey;
  for (int64_t base = 0; base < per_stream; base += batch) {
    for (int j = threadIdx.x; j < batch; j += blockDim.x) {
      buf[k_eff + j] = base + j < per_stream ? src[base + j] : kEmptyKey;
    }
    __syncthreads();
    bitonic_sort_desc(buf, buffer);
  }
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {  // k may exceed int32 (the padding)
    decode_key(j < k_eff ? buf[j] : kEmptyKey, scores + b * k + j, ids + b * k + j);
  }
}

// Decodes the flipped (signed-order) keys chosen by torch.topk in the large-k path.
__global__ void decode_keys_kernel(const int64_t* __restrict__ flipped, int64_t B, int k_eff, int64_t k,
                                   float* __restrict__ scores, int64_t* __restrict__ ids) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * k) return;
  const int64_t b = i / k, j = i % k;
  const uint64_t key = j < k_eff ? static_cast<uint64_t>(flipped[b * k_eff + j]) ^ (1ull << 63) : kEmptyKey;
  decode_key(key, scores + i, ids + i);
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cuda(const at::Tensor& queries, const at::Tensor& pages,
                                                    const at::Tensor& page_table, const at::Tensor& lo,
                                                    const at::Tensor& hi, int64_t k) {
  const CosineTopkGeometry g = check_cosine_topk_args(queries, pages, page_table, lo, hi, k);
  TORCH_CHECK(g.dim <= kMaxDim, "queries.shape[1] (D) must be <= ", kMaxDim, " on CUDA, got ", g.dim);
  const gpu::DeviceGuard guard(queries.device());
  at::Tensor scores, ids;
  std::tie(scores, ids) = empty_topk_results(queries, g);
  if (g.streams == 0) return {scores, ids};
  if (g.capacity == 0 || g.num_pages == 0) {
    scores.fill_(-std::numeric_limits<float>::infinity());
    ids.fill_(-1);
    return {scores, ids};
  }

  const at::Tensor pages_c = pages.stride(2) == 1 ? pages : pages.contiguous();
  const at::Tensor q = queries.contiguous(), table = page_table.contiguous(), lo_c = lo.contiguous(),
                   hi_c = hi.contiguous();
  const cudaStream_t stream = gpu::current_stream();
  const int sms = gpu::sm_count();

  // Checked first: it also bounds capacity * streams below (capacity < 2^31).
  TORCH_CHECK(g.streams <= 65535, "queries.shape[0] (B) must be <= 65535 on CUDA (the grid's y dimension), got ",
              g.streams);
  // Chunk: a power of two in [128, 1024], small enough that the grid has >= ~2 blocks per SM.
  const int64_t target_blocks = 2 * static_cast<int64_t>(sms);
  const int64_t per_block = ceil_div<int64_t>(g.capacity * g.streams, target_blocks);
  int64_t chunk = kMinChunk;
  while (chunk < kMaxChunk && chunk < per_block) chunk <<= 1;
  const int64_t num_chunks = ceil_div<int64_t>(g.capacity, chunk);  // < 2^31 / kMinChunk: fits grid.x
  const int64_t k_eff = std::min<int64_t>(k, g.capacity);
  const bool small_k = k_eff <= kMaxMergeK;
  const int64_t keep = small_k ? std::min<int64_t>(k_eff, chunk) : chunk;
  at::Tensor partial = at::empty({g.streams, num_chunks, keep}, queries.options().dtype(at::kLong));

  LRAG_DISPATCH_FLOAT_TYPES(queries.scalar_type(), "cosine_topk_cuda", [&] {
    constexpr int64_t kPer = 16 / sizeof(scalar_t);
    const bool vec = g.dim % kPer == 0 && pages_c.stride(0) % kPer == 0 && pages_c.stride(1) % kPer == 0 &&
                     reinterpret_cast<uintptr_t>(pages_c.data_ptr()) % 16 == 0;
    const int64_t loads = vec ? g.dim / kPer : g.dim;
    const int tpe = static_cast<int>(std::min<int64_t>(32, next_pow2(loads)));
    const size_t smem = chunk * sizeof(uint64_t) + g.dim * sizeof(float);
    const dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(g.streams));
    auto launch = [&](auto kernel) {
      LRAG_LAUNCH(kernel, grid, kScoreThreads, smem, stream)(
          q.data_ptr<scalar_t>(), pages_c.data_ptr<scalar_t>(), pages_c.stride(0), pages_c.stride(1), g.num_pages,
          g.page_size, table.data_ptr<int32_t>(), g.max_pages, lo_c.data_ptr<int64_t>(), hi_c.data_ptr<int64_t>(),
          g.capacity, g.dim, static_cast<int>(chunk), tpe, static_cast<int>(keep),
          reinterpret_cast<uint64_t*>(partial.data_ptr<int64_t>()));
      gpu::check_launch();
    };
    if (vec) {
      launch(score_chunks_kernel<scalar_t, true>);
    } else {
      launch(score_chunks_kernel<scalar_t, false>);
    }
  });

  const int64_t per_stream = num_chunks * keep;
  if (small_k) {
    const int64_t buffer = std::min<int64_t>(kMaxMergeBuffer, next_pow2(std::max<int64_t>(k_eff + per_stream, 2)));
    const int64_t buffer_ok = std::max<int64_t>(buffer, next_pow2(2 * k_eff));  // room for >= k_eff candidates
    LRAG_LAUNCH(merge_partials_kernel, static_cast<unsigned>(g.streams), kMergeThreads,
                buffer_ok * sizeof(uint64_t), stream)(
        reinterpret_cast<const uint64_t*>(partial.data_ptr<int64_t>()), per_stream, static_cast<int>(k_eff), k,
        static_cast<int>(buffer_ok), scores.data_ptr<float>(), ids.data_ptr<int64_t>());
    gpu::check_launch();
  } else {
    // Flip the top bit so that signed int64 order equals the unsigned key order, then an exact topk.
    const at::Tensor flipped = partial.view({g.streams, per_stream}).bitwise_xor(std::numeric_limits<int64_t>::min());
    const at::Tensor best = std::get<0>(flipped.topk(k_eff, /*dim=*/1, /*largest=*/true, /*sorted=*/true)).contiguous();
    const int64_t total = g.streams * k;
    const int threads = 256;
    LRAG_LAUNCH(decode_keys_kernel, static_cast<unsigned>(ceil_div<int64_t>(total, threads)), threads, 0, stream)(
        best.data_ptr<int64_t>(), g.streams, static_cast<int>(k_eff), k, scores.data_ptr<float>(),
        ids.data_ptr<int64_t>());
    gpu::check_launch();
  }
  return {scores, ids};
}

}  // namespace

LRAG_CUDA_IMPL(m) { m.impl("cosine_topk", &cosine_topk_cuda); }

}  // namespace lrag
