// CUDA kernels of lrag_ext::write_kv and lrag_ext::gather_kv (the paged KV pool).
//
// Both ops are one "frame copy" kernel. An item is (entry e, layer l, K or V); the grid is
// (chunks of one frame, items), so all layers and all frames of a call go in one launch. Each side (source,
// destination) of an item is addressed as
//     base[kv] + slot * stride_slot[kv] + (e / m) * stride_b[kv] + col * stride_col[kv] + l * stride_layer[kv]
// with slot = slots[e] and col = dst_frame[e] (gather) or e (write), then token / head / head_dim inside the
// frame. gather: the source is the pool (stride_slot), the destination the cache (stride_b, stride_col);
// write: the source is src_k/src_v (stride_col), the destination the pool (stride_slot).
//
// Each thread moves kIters vectors of N elements (16 bytes of the wider dtype when every pointer and stride
// allows it, else 2 elements with scalar accesses), loading all of them before storing any. K's temporal RoPE
// pairs are rotated in float64 (kernels/kv_rope.h), as on the CPU, by a per-entry cos/sin table that a small
// kernel (rope_table_kernel) computes first, so the copy loop carries no transcendental (sincos alone cost the
// copy kernel ~30 registers and a stack frame). Values are never validated on the host (that would synchronise): items with a slot outside
// [0, num_slots) or a column outside [0, num_cols) are skipped.
//
// The pool may live in pinned host memory: the kernel then reads (or writes) it over PCIe through its mapped
// device pointer, in stream order, and the host allocator is told that the current stream uses the block.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/runtime.cuh"
#include "kernels/kv_rope.h"
#include "kv_pool_common.h"

namespace lrag {
namespace {

constexpr int kThreads = 256;
constexpr int kIters = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxRopePairs = 2048;  // the documented CUDA limit on rope_temporal_pairs

// Element strides of one side of the copy: per slot, stream b, column, layer, token, head.
struct SideStrides {
  int64_t slot, b, col, layer, token, head;
};

// The pool side: [num_slots, layers, 2, tokens, heads, head_dim].
SideStrides pool_strides(const at::Tensor& pool) {
  return {pool.stride(0), 0, 0, pool.stride(1), pool.stride(3), pool.stride(4)};
}

struct KvCopyParams {
  const void* src[2];  // K (0) and V (1) bases of the source, element type S
  void* dst[2];        // K and V bases of the destination, element type D
  SideStrides ss[2], ds[2];
  const int64_t* slots;  // [entries]
  const int64_t* col;    // [entries] (gather: dst_frame) or nullptr (write: col = e % m)
  const int64_t* delta;  // [entries] or nullptr (no rotation)
  const double* rope_cs;  // [entries, rope_pairs, 2]: cos and sin of delta[e] * omega_q (rope_table_kernel)
  int64_t entries, m, num_slots, num_cols, layers;
  uint32_t heads, vecs_per_row, vecs_per_frame;
  int32_t rope_pairs;
  // float8_e4m3fn pools: pool_scale [num_slots, layers, 2] (read by gather, written by write), and for write the
  // per-item amax of the sources (kv_amax_kernel).
  float* scale;
  int64_t scale_slot, scale_layer, scale_kv;
  const float* amax;
};

// N elements; 16-byte (or 8-byte) aligned for the vector path, element-aligned for the 2-element fallback.
template <typename T, int N>
struct alignas(N >= 4 ? sizeof(T) * N : sizeof(T)) Vec {
  T v[N];
};

// load_value (kv_pool_common.h) with fp8 decoded by the device's conversion (runtime.cuh).
template <typename S>
__device__ __forceinline__ float dev_load(S x, float scale) {
  if constexpr (is_fp8_v<S>) {
    return fp8_e4m3_to_float(x.x) * scale;
  } else {
    return load_value(x, scale);
  }
}

// One item of a call: entry e's frame in layer l, K (kv 0) or V (kv 1). Uniform over a block.
struct Item {
  int64_t e, l, slot, col, b;
  int kv;
};

// Decodes `item`; false when its entry is skipped (slot or column outside its range, -1 included).
__device__ __forceinline__ bool decode_item(const KvCopyParams& p, int64_t item, Item& it) {
  it.e = item / (2 * p.layers);
  const int64_t r = item - it.e * 2 * p.layers;
  it.l = r >> 1;
  it.kv = static_cast<int>(r & 1);
  it.slot = p.slots[it.e];
  it.col = p.col != nullptr ? p.col[it.e] : it.e % p.m;
  it.b = it.e / p.m;
  return it.slot >= 0 && it.slot < p.num_slots && it.col >= 0 && it.col < p.num_cols;
}

// Start of the item's frame on one side (base = that side's K or V base).
template <typename T>
__device__ __forceinline__ T* frame_start(const void* base, const SideStrides& st, const Item& it) {
  return static_cast<T*>(const_cast<void*>(base)) + it.slot * st.slot + it.b * st.b + it.col * st.col +
         it.l * st.layer;
}

// Token, head and first element of vector v (N elements) inside a frame.
struct VecPos {
  uint32_t t, h, c0;
};

template <int N>
__device__ __forceinline__ VecPos vec_pos(const KvCopyParams& p, uint32_t v) {
  const uint32_t row = v / p.vecs_per_row;
  const uint32_t t = row / p.heads;
  return {t, row - t * p.heads, (v - row * p.vecs_per_row) * N};
}

// cs[e, q] = (cos, sin)(delta[e] * omega_q) for every entry e and temporal pair q, in float64.
__global__ void rope_table_kernel(const int64_t* __restrict__ delta, int64_t entries, int32_t pairs, double theta,
                                  double* __restrict__ cs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= entries * pairs) return;
  const int64_t e = i / pairs, q = i - e * pairs;
  double s, c;
  sincos(static_cast<double>(delta[e]) * rope_inv_freq(q, pairs, theta), &s, &c);
  cs[2 * i] = c;
  cs[2 * i + 1] = s;
}

template <typename S, typename D, int N>
__global__ void __launch_bounds__(kThreads) kv_copy_kernel(const KvCopyParams p) {
  const int64_t items = p.entries * p.layers * 2;
  const uint32_t v_first = blockIdx.x * (kThreads * kIters) + threadIdx.x;
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    // Everything up to the copy is uniform over the block (it depends on the item only).
    Item itm;
    if (!decode_item(p, item, itm)) continue;
    const int kv = itm.kv;
    const bool rotate = kv == 0 && p.rope_cs != nullptr && p.delta[itm.e] != 0;
    const double* cs = rotate ? p.rope_cs + itm.e * 2 * p.rope_pairs : nullptr;
    float scale = 1.0f;  // fp8 (de)quantisation scale of this item
    if constexpr (is_fp8_v<S> || is_fp8_v<D>) {
      float* item_scale = p.scale + itm.slot * p.scale_slot + itm.l * p.scale_layer + kv * p.scale_kv;
      if constexpr (is_fp8_v<S>) scale = *item_scale;
      if constexpr (is_fp8_v<D>) {
        scale = fp8_scale_for(p.amax[item]);
        if (blockIdx.x == 0 && threadIdx.x == 0) *item_scale = scale;
      }
    }
    // Constant indices only: a runtime index into the by-value parameter struct would copy it to local memory.
    const SideStrides ss = kv == 0 ? p.ss[0] : p.ss[1];
    const SideStrides ds = kv == 0 ? p.ds[0] : p.ds[1];
    const S* src = frame_start<const S>(kv == 0 ? p.src[0] : p.src[1], ss, itm);
    D* dst = frame_start<D>(kv == 0 ? p.dst[0] : p.dst[1], ds, itm);

    Vec<S, N> x[kIters];
    int64_t dst_off[kIters];
    uint32_t first_pair[kIters];
    bool ok[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const uint32_t v = v_first + it * kThreads;
      ok[it] = v < p.vecs_per_frame;
      if (ok[it]) {
        const VecPos q = vec_pos<N>(p, v);
        first_pair[it] = q.c0 / 2;
        dst_off[it] = q.t * ds.token + q.h * ds.head + q.c0;
        x[it] = *reinterpret_cast<const Vec<S, N>*>(src + q.t * ss.token + q.h * ss.head + q.c0);
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (!ok[it]) continue;
      Vec<D, N> y;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const uint32_t q = first_pair[it] + i;
        if (rotate && q < static_cast<uint32_t>(p.rope_pairs)) {
          double yr, yi;
          rotate_pair(static_cast<double>(dev_load(x[it].v[2 * i], scale)),
                      static_cast<double>(dev_load(x[it].v[2 * i + 1], scale)), cs[2 * q], cs[2 * q + 1], &yr, &yi);
          y.v[2 * i] = store_value<D>(static_cast<float>(yr), scale);  // double -> float -> D, as torch casts
          y.v[2 * i + 1] = store_value<D>(static_cast<float>(yi), scale);
        } else {
          y.v[2 * i] = store_value<D>(dev_load(x[it].v[2 * i], scale), scale);
          y.v[2 * i + 1] = store_value<D>(dev_load(x[it].v[2 * i + 1], scale), scale);
        }
      }
      *reinterpret_cast<Vec<D, N>*>(dst + dst_off[it]) = y;
    }
  }
}

// fp8 write, first pass: amax[item] = max |x| over the source frame of each item (same item/chunk split as
// kv_copy_kernel; amax must be zeroed). Non-negative floats order like their int bits, so atomicMax on the bits
// is a float max.
template <typename S, int N>
__global__ void __launch_bounds__(kThreads) kv_amax_kernel(const KvCopyParams p, float* amax) {
  const int64_t items = p.entries * p.layers * 2;
  const uint32_t v_first = blockIdx.x * (kThreads * kIters) + threadIdx.x;
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    Item itm;
    if (!decode_item(p, item, itm)) continue;
    const SideStrides ss = itm.kv == 0 ? p.ss[0] : p.ss[1];
    const S* src = frame_start<const S>(itm.kv == 0 ? p.src[0] : p.src[1], ss, itm);
    float m = 0.0f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const uint32_t v = v_first + it * kThreads;
      if (v < p.vecs_per_frame) {
        const VecPos q = vec_pos<N>(p, v);
        const Vec<S, N> x = *reinterpret_cast<const Vec<S, N>*>(src + q.t * ss.token + q.h * ss.head + q.c0);
#pragma unroll
        for (int i = 0; i < N; ++i) m = fp8_amax_fold(m, static_cast<float>(x.v[i]));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0 && m > 0.0f) atomicMax(reinterpret_cast<int*>(amax + item), __float_as_int(m));
  }
}

// Device-accessible address of a pool: itself on `device`, or the mapped device pointer of pinned host memory.
void* device_address(const at::Tensor& pool, const at::Device& device, const char* other,
                     const char* name = "pool") {
  if (gpu::is_device_tensor(pool)) {
    TORCH_CHECK(pool.device() == device, name, " must be on ", device, " (the device of ", other,
                ") or in pinned host memory, got ", pool.device());
    return pool.data_ptr();
  }
  TORCH_CHECK(pool.is_cpu(), name, " must be a ", gpu::kTensorKind, " tensor or pinned host memory, got ",
              pool.device());
  if (pool.numel() == 0) return nullptr;
  void* mapped = gpu::mapped_host_pointer(pool);
  TORCH_CHECK(mapped != nullptr, name, " is in host memory that is not pinned: allocate it with pin_memory=True "
              "(lrag_ext.kv_pool_empty(..., pin_memory=True)) or move it to ", device);
  return mapped;
}

// Fills the fp8 scale fields of p (no-op for other pools).
void set_scale(KvCopyParams& p, const std::optional<at::Tensor>& pool_scale, const at::Device& device,
               const char* other) {
  if (!pool_scale.has_value()) return;
  p.scale = static_cast<float*>(device_address(*pool_scale, device, other, "pool_scale"));
  p.scale_slot = pool_scale->stride(0);
  p.scale_layer = pool_scale->stride(1);
  p.scale_kv = pool_scale->stride(2);
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Whether every pointer and stride of p allows N-element vector accesses.
template <typename S, typename D>
bool vector_ok(const KvCopyParams& p, int64_t head_dim, int N) {
  if (head_dim % N != 0) return false;
  for (int kv = 0; kv < 2; ++kv) {
    if (!aligned(p.src[kv], N * sizeof(S)) || !aligned(p.dst[kv], N * sizeof(D))) return false;
    for (const SideStrides& st : {p.ss[kv], p.ds[kv]}) {
      for (int64_t s : {st.slot, st.b, st.col, st.layer, st.token, st.head}) {
        if (s % N != 0) return false;
      }
    }
  }
  return true;
}

template <bool kSrcFp8, bool kDstFp8>
void run_kv_copy(KvCopyParams p, const KvGeometry& g, at::ScalarType src_type, at::ScalarType dst_type,
                 const at::Device& device, cudaStream_t stream) {
  // check_pool bounds frame_elems; an empty frame leaves the other sizes arbitrary, so nothing is multiplied first.
  const int64_t frame_elems = g.tokens * g.heads * g.head_dim;
  if (frame_elems == 0 || p.entries == 0 || p.layers == 0) return;
  const int64_t items = size_product({p.entries, p.layers, 2});
  TORCH_CHECK(items >= 0, "too many frames for one call: entries (", p.entries, ") * layers (", p.layers,
              ") * 2 overflows int64");
  p.heads = static_cast<uint32_t>(g.heads);
  dispatch_float_pair<kSrcFp8, kDstFp8>(src_type, dst_type, [&](auto s_tag, auto d_tag) {
    using S = decltype(s_tag);
    using D = decltype(d_tag);
    constexpr int kWide = 16 / (sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D));
    auto go = [&](auto n_tag) {
      constexpr int N = decltype(n_tag)::value;
      p.vecs_per_row = static_cast<uint32_t>(g.head_dim / N);
      p.vecs_per_frame = static_cast<uint32_t>(frame_elems / N);
      const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.vecs_per_frame, kThreads * kIters)),
                      static_cast<unsigned>(std::min(items, kMaxGridY)));
      at::Tensor amax;
      if constexpr (is_fp8_v<D>) {  // two passes: per-item amax, then the scaled copy
        amax = at::zeros({items}, at::TensorOptions().dtype(at::kFloat).device(device));
        auto* amax_kernel = kv_amax_kernel<S, N>;
        LRAG_LAUNCH(amax_kernel, grid, kThreads, 0, stream)(p, amax.data_ptr<float>());
        gpu::check_launch();
        p.amax = amax.data_ptr<float>();
      }
      auto* copy_kernel = kv_copy_kernel<S, D, N>;
      LRAG_LAUNCH(copy_kernel, grid, kThreads, 0, stream)(p);
      gpu::check_launch();
    };
    if (vector_ok<S, D>(p, g.head_dim, kWide)) {
      go(std::integral_constant<int, kWide>{});
    } else {
      go(std::integral_constant<int, 2>{});
    }
  });
}

void write_kv_cuda(at::Tensor pool, const at::Tensor& src_k, const at::Tensor& src_v, const at::Tensor& slots,
                   const std::optional<at::Tensor>& pool_scale) {
  const KvGeometry g = check_write_kv_args(pool, src_k, src_v, slots);
  check_pool_scale(pool, g, pool_scale);
  check_write_kv_aliasing(pool, src_k, src_v, slots, pool_scale);
  TORCH_CHECK(gpu::is_device_tensor(src_k), "src_k must be a ", gpu::kTensorKind, " tensor, got ", src_k.device());
  const gpu::DeviceGuard guard(src_k.device());
  void* pool_ptr = device_address(pool, src_k.device(), "src_k");
  const gpu::Stream stream = gpu::current_stream();
  const int64_t n = slots.size(0);
  if (n == 0 || g.num_slots == 0) return;

  auto dense_last = [](const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor sk = dense_last(src_k), sv = dense_last(src_v), sl = slots.contiguous();
  KvCopyParams p{};
  const at::Tensor* src[2] = {&sk, &sv};
  for (int kv = 0; kv < 2; ++kv) {
    // src_k/src_v [layers, n, tokens, heads, head_dim]: the column is the frame index n.
    p.src[kv] = src[kv]->data_ptr();
    p.ss[kv] = {0, 0, src[kv]->stride(1), src[kv]->stride(0), src[kv]->stride(2), src[kv]->stride(3)};
    p.dst[kv] = static_cast<char*>(pool_ptr) + kv * pool.stride(2) * pool.element_size();
    p.ds[kv] = pool_strides(pool);
  }
  p.slots = sl.data_ptr<int64_t>();
  p.col = nullptr;
  p.delta = nullptr;
  p.entries = n;
  p.m = n;
  p.num_slots = g.num_slots;
  p.num_cols = n;
  p.layers = g.layers;
  p.rope_pairs = 0;
  p.rope_cs = nullptr;
  set_scale(p, pool_scale, src_k.device(), "src_k");
  run_kv_copy<false, true>(p, g, sk.scalar_type(), pool.scalar_type(), src_k.device(), stream.stream());
  gpu::record_host_use(pool, stream);
  if (pool_scale.has_value()) gpu::record_host_use(*pool_scale, stream);
}

void gather_kv_cuda(const at::Tensor& pool, const at::Tensor& slots, at::Tensor dst_k, at::Tensor dst_v,
                    const at::Tensor& dst_frame, const at::Tensor& delta, int64_t rope_temporal_pairs,
                    double rope_theta, const std::optional<at::Tensor>& pool_scale) {
  const KvGeometry g =
      check_gather_kv_args(pool, slots, dst_k, dst_v, dst_frame, delta, rope_temporal_pairs, rope_theta);
  check_pool_scale(pool, g, pool_scale);
  check_gather_kv_aliasing(pool, slots, dst_k, dst_v, dst_frame, delta, pool_scale);
  TORCH_CHECK(gpu::is_device_tensor(dst_k), "dst_k must be a ", gpu::kTensorKind, " tensor, got ", dst_k.device());
  TORCH_CHECK(rope_temporal_pairs <= kMaxRopePairs, "rope_temporal_pairs must be <= ", kMaxRopePairs,
              " on CUDA, got ", rope_temporal_pairs);
  const gpu::DeviceGuard guard(dst_k.device());
  const void* pool_ptr = device_address(pool, dst_k.device(), "dst_k");
  const gpu::Stream stream = gpu::current_stream();
  if (slots.numel() == 0 || g.num_slots == 0 || dst_k.size(2) == 0) return;

  const at::Tensor sl = slots.contiguous(), fr = dst_frame.contiguous(), dl = delta.contiguous();
  KvCopyParams p{};
  const at::Tensor* dst[2] = {&dst_k, &dst_v};
  for (int kv = 0; kv < 2; ++kv) {
    p.src[kv] = static_cast<const char*>(pool_ptr) + kv * pool.stride(2) * pool.element_size();
    p.ss[kv] = pool_strides(pool);
    // dst_k/dst_v [layers, B, cache_frames, tokens, heads, head_dim]: the column is the cache frame.
    p.dst[kv] = dst[kv]->data_ptr();
    p.ds[kv] = {0, dst[kv]->stride(1), dst[kv]->stride(2), dst[kv]->stride(0), dst[kv]->stride(3),
                dst[kv]->stride(4)};
  }
  p.slots = sl.data_ptr<int64_t>();
  p.col = fr.data_ptr<int64_t>();
  p.delta = dl.data_ptr<int64_t>();
  p.entries = slots.numel();
  p.m = slots.size(1);
  p.num_slots = g.num_slots;
  p.num_cols = dst_k.size(2);
  p.layers = g.layers;
  p.rope_pairs = static_cast<int32_t>(rope_temporal_pairs);
  p.rope_cs = nullptr;
  at::Tensor rope_cs;  // lives until the copy is enqueued; the caching allocator orders its reuse by stream
  if (p.rope_pairs > 0) {
    rope_cs = at::empty({p.entries, p.rope_pairs, 2}, dst_k.options().dtype(at::kDouble));
    const int64_t n = p.entries * p.rope_pairs;
    constexpr int kTableThreads = 128;
    LRAG_LAUNCH(rope_table_kernel, static_cast<unsigned>(ceil_div<int64_t>(n, kTableThreads)), kTableThreads, 0,
                stream.stream())(p.delta, p.entries, p.rope_pairs, rope_theta, rope_cs.data_ptr<double>());
    gpu::check_launch();
    p.rope_cs = rope_cs.data_ptr<double>();
  }
  set_scale(p, pool_scale, dst_k.device(), "dst_k");
  run_kv_copy<true, false>(p, g, pool.scalar_type(), dst_k.scalar_type(), dst_k.device(), stream.stream());
  gpu::record_host_use(pool, stream);
  if (pool_scale.has_value()) gpu::record_host_use(*pool_scale, stream);
}

}  // namespace

LRAG_CUDA_IMPL(m) {
  m.impl("write_kv", &write_kv_cuda);
  m.impl("gather_kv", &gather_kv_cuda);
}

}  // namespace lrag
