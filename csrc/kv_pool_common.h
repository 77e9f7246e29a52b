// Argument checks and geometry of the paged KV pool ops (write_kv, gather_kv), shared by their CPU and CUDA
// hosts. Only metadata is read here (shapes, strides, dtypes, devices), so nothing synchronises a device.
//
// Pool layout: [num_slots, layers, 2 (K, V), tokens, heads, head_dim]; any strides, but head_dim dense.
// A float8_e4m3fn pool carries pool_scale [num_slots, layers, 2] float32: stored value = float(q) * scale, with
// scale = amax(|finite values of the frame's K (or V) in that layer|) / 448 (1 when that is 0), written by write_kv.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "kernels/common.h"

namespace lrag {

struct KvGeometry {
  int64_t num_slots;
  int64_t layers;
  int64_t tokens;
  int64_t heads;
  int64_t head_dim;
};

// Element strides of one side (source or destination) of a frame copy: between layers, tokens and heads of
// one frame's [layers, tokens, heads, head_dim] (head_dim is always dense).
struct FrameStrides {
  int64_t layer;
  int64_t token;
  int64_t head;
};

inline void check_last_dim_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must be dense in its last dim (head_dim), got strides ",
              t.strides());
}

// Largest finite float8_e4m3fn: write_kv maps each frame's amax onto it.
constexpr float kFp8E4m3Max = 448.0f;

template <typename T>
constexpr bool is_fp8_v = std::is_same_v<T, c10::Float8_e4m3fn>;

inline KvGeometry check_pool(const at::Tensor& pool) {
  check_dim(pool, 6, "pool", "[num_slots, layers, 2, tokens, heads, head_dim]");
  const auto s = pool.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kFloat8_e4m3fn,
              "pool must be float32, float16, bfloat16 or float8_e4m3fn, got ", dtype_name(s));
  TORCH_CHECK(pool.size(2) == 2, "pool.shape[2] must be 2 (K and V), got ", pool.size(2));
  check_last_dim_dense(pool, "pool");
  KvGeometry g{pool.size(0), pool.size(1), pool.size(3), pool.size(4), pool.size(5)};
  TORCH_CHECK(g.head_dim % 2 == 0, "pool.shape[5] (head_dim) must be even (RoPE pairs), got ", g.head_dim);
  // The CUDA kernels index inside one frame with 32-bit integers. (The sizes of an empty pool are arbitrary:
  // their product is checked for overflow, not computed.)
  const int64_t frame = size_product({g.tokens, g.heads, g.head_dim});
  TORCH_CHECK(frame >= 0 && frame < std::numeric_limits<int32_t>::max(),
              "tokens * heads * head_dim of one frame must be < 2^31 - 1, got ", g.tokens, " * ", g.heads, " * ",
              g.head_dim);
  return g;
}

// Checks that `t` has the frame geometry of the pool in its last three dims (dims `first`..`first+2`) and
// the pool's layer count in dim 0.
inline void check_frame_geometry(const at::Tensor& t, const KvGeometry& g, const char* name) {
  const int64_t d = t.dim();
  check_size(t, 0, g.layers, name, "pool.shape[1] (layers)");
  check_size(t, d - 3, g.tokens, name, "pool.shape[3] (tokens)");
  check_size(t, d - 2, g.heads, name, "pool.shape[4] (heads)");
  check_size(t, d - 1, g.head_dim, name, "pool.shape[5] (head_dim)");
}

inline void check_index(const at::Tensor& t, const char* name, const char* shape, int64_t dim) {
  check_dim(t, dim, name, shape);
  check_dtype(t, at::kLong, name);
}

// pool_scale is required with a float8_e4m3fn pool and refused otherwise; it lives with the pool (same device).
// Returns whether the pool is fp8.
inline bool check_pool_scale(const at::Tensor& pool, const KvGeometry& g,
                             const std::optional<at::Tensor>& pool_scale) {
  const bool fp8 = pool.scalar_type() == at::kFloat8_e4m3fn;
  if (!fp8) {
    TORCH_CHECK(!pool_scale.has_value(), "pool_scale is only used with a float8_e4m3fn pool; pool is ",
                dtype_name(pool.scalar_type()));
    return false;
  }
  TORCH_CHECK(pool_scale.has_value(), "a float8_e4m3fn pool needs pool_scale [num_slots, layers, 2] float32");
  const at::Tensor& sc = *pool_scale;
  check_dim(sc, 3, "pool_scale", "[num_slots, layers, 2]");
  check_dtype(sc, at::kFloat, "pool_scale");
  check_size(sc, 0, g.num_slots, "pool_scale", "pool.shape[0] (num_slots)");
  check_size(sc, 1, g.layers, "pool_scale", "pool.shape[1] (layers)");
  check_size(sc, 2, 2, "pool_scale", "2 (K, V)");
  check_same_device(sc, pool, "pool_scale", "pool");
  return true;
}

// write_kv(pool, src_k, src_v, slots): src_* [layers, n, tokens, heads, head_dim], slots [n] int64.
inline KvGeometry check_write_kv_args(const at::Tensor& pool, const at::Tensor& src_k, const at::Tensor& src_v,
                                      const at::Tensor& slots) {
  const KvGeometry g = check_pool(pool);
  check_dim(src_k, 5, "src_k", "[layers, n, tokens, heads, head_dim]");
  check_float_dtype(src_k, "src_k");
  check_frame_geometry(src_k, g, "src_k");
  TORCH_CHECK(src_v.sizes() == src_k.sizes(), "src_v must have the shape of src_k (", src_k.sizes(), "), got ",
              src_v.sizes());
  TORCH_CHECK(src_v.scalar_type() == src_k.scalar_type(), "src_v must have the dtype of src_k (",
              dtype_name(src_k.scalar_type()), "), got ", dtype_name(src_v.scalar_type()));
  check_index(slots, "slots", "[n]", 1);
  check_size(slots, 0, src_k.size(1), "slots", "src_k.shape[1] (n)");
  check_same_device(src_v, src_k, "src_v", "src_k");
  check_same_device(slots, src_k, "slots", "src_k");
  return g;
}

// gather_kv(pool, slots, dst_k, dst_v, dst_frame, delta, pairs, theta): slots, dst_frame, delta [B, m] int64;
// dst_* [layers, B, cache_frames, tokens, heads, head_dim].
inline KvGeometry check_gather_kv_args(const at::Tensor& pool, const at::Tensor& slots, const at::Tensor& dst_k,
                                       const at::Tensor& dst_v, const at::Tensor& dst_frame,
                                       const at::Tensor& delta, int64_t rope_temporal_pairs, double rope_theta) {
  const KvGeometry g = check_pool(pool);
  check_dim(dst_k, 6, "dst_k", "[layers, B, cache_frames, tokens, heads, head_dim]");
  check_float_dtype(dst_k, "dst_k");
  check_frame_geometry(dst_k, g, "dst_k");
  check_last_dim_dense(dst_k, "dst_k");
  TORCH_CHECK(dst_v.sizes() == dst_k.sizes(), "dst_v must have the shape of dst_k (", dst_k.sizes(), "), got ",
              dst_v.sizes());
  TORCH_CHECK(dst_v.scalar_type() == dst_k.scalar_type(), "dst_v must have the dtype of dst_k (",
              dtype_name(dst_k.scalar_type()), "), got ", dtype_name(dst_v.scalar_type()));
  check_last_dim_dense(dst_v, "dst_v");
  check_index(slots, "slots", "[B, m]", 2);
  check_size(slots, 0, dst_k.size(1), "slots", "dst_k.shape[1] (B)");
  check_index(dst_frame, "dst_frame", "[B, m]", 2);
  TORCH_CHECK(dst_frame.sizes() == slots.sizes(), "dst_frame must have the shape of slots (", slots.sizes(),
              "), got ", dst_frame.sizes());
  check_index(delta, "delta", "[B, m]", 2);
  TORCH_CHECK(delta.sizes() == slots.sizes(), "delta must have the shape of slots (", slots.sizes(), "), got ",
              delta.sizes());
  check_same_device(dst_v, dst_k, "dst_v", "dst_k");
  check_same_device(slots, dst_k, "slots", "dst_k");
  check_same_device(dst_frame, dst_k, "dst_frame", "dst_k");
  check_same_device(delta, dst_k, "delta", "dst_k");
  // Compared without multiplying: 2 * rope_temporal_pairs overflows for values near 2^62.
  TORCH_CHECK(rope_temporal_pairs >= 0 && rope_temporal_pairs <= g.head_dim / 2,
              "rope_temporal_pairs must be in [0, head_dim / 2 = ", g.head_dim / 2, "], got ", rope_temporal_pairs);
  TORCH_CHECK(rope_theta > 0.0 && std::isfinite(rope_theta), "rope_theta must be a positive finite number, got ",
              rope_theta);
  return g;
}

// The outputs of write_kv (pool, pool_scale) must not alias: no stride-0 dim, no memory shared with an input
// or with each other. Without this, a frame written to a stride-0 pool lands in every slot (last writer wins)
// and a pool that overlaps a source is read after being overwritten.
inline void check_write_kv_aliasing(const at::Tensor& pool, const at::Tensor& src_k, const at::Tensor& src_v,
                                    const at::Tensor& slots, const std::optional<at::Tensor>& pool_scale) {
  check_no_internal_overlap(pool, "pool");
  check_no_overlap(pool, "pool", src_k, "src_k");
  check_no_overlap(pool, "pool", src_v, "src_v");
  check_no_overlap(pool, "pool", slots, "slots");
  if (!pool_scale.has_value()) return;
  check_no_internal_overlap(*pool_scale, "pool_scale");
  check_no_overlap(*pool_scale, "pool_scale", pool, "pool");
  check_no_overlap(*pool_scale, "pool_scale", src_k, "src_k");
  check_no_overlap(*pool_scale, "pool_scale", src_v, "src_v");
  check_no_overlap(*pool_scale, "pool_scale", slots, "slots");
}

// The outputs of gather_kv (dst_k, dst_v) must not alias: no stride-0 dim, not each other, no input.
inline void check_gather_kv_aliasing(const at::Tensor& pool, const at::Tensor& slots, const at::Tensor& dst_k,
                                     const at::Tensor& dst_v, const at::Tensor& dst_frame, const at::Tensor& delta,
                                     const std::optional<at::Tensor>& pool_scale) {
  check_no_internal_overlap(dst_k, "dst_k");
  check_no_internal_overlap(dst_v, "dst_v");
  check_no_overlap(dst_k, "dst_k", dst_v, "dst_v");
  const at::Tensor* outs[2] = {&dst_k, &dst_v};
  const char* out_names[2] = {"dst_k", "dst_v"};
  for (int i = 0; i < 2; ++i) {
    check_no_overlap(*outs[i], out_names[i], pool, "pool");
    check_no_overlap(*outs[i], out_names[i], slots, "slots");
    check_no_overlap(*outs[i], out_names[i], dst_frame, "dst_frame");
    check_no_overlap(*outs[i], out_names[i], delta, "delta");
    if (pool_scale.has_value()) check_no_overlap(*outs[i], out_names[i], *pool_scale, "pool_scale");
  }
}

// Element conversion of the copies (CPU and CUDA): through float, with fp8 (de)quantisation by the slot's scale.
template <typename S>
LRAG_HD float load_value(S x, float scale) {
  float v = static_cast<float>(x);
  if constexpr (is_fp8_v<S>) v *= scale;
  return v;
}

template <typename D>
LRAG_HD D store_value(float v, float scale) {
  if constexpr (is_fp8_v<D>) v /= scale;
  return static_cast<D>(v);
}

// One step of the amax that sets a frame's fp8 scale: max(m, |x|) over FINITE x only, so that a NaN or inf in
// a frame cannot poison its scale (every finite value keeps its precision; NaN is stored as the fp8 NaN and
// +-inf saturates to +-448, as torch's cast does).
LRAG_HD float fp8_amax_fold(float m, float x) {
  const float a = x < 0.0f ? -x : x;
  return a <= 3.402823466e+38f && a > m ? a : m;  // false for NaN and inf
}

// The scale write_kv stores for a frame whose K (or V) in one layer has max finite |x| = amax.
LRAG_HD float fp8_scale_for(float amax) { return amax > 0.0f ? amax / kFp8E4m3Max : 1.0f; }

// Calls f(T{}) with T the C++ type of a float dtype (float, c10::Half, c10::BFloat16, and with kFp8 also
// c10::Float8_e4m3fn). Only the types a caller asks for are instantiated.
template <bool kFp8 = false, typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    default: break;
  }
  if constexpr (kFp8) {
    if (t == at::kFloat8_e4m3fn) {
      f(c10::Float8_e4m3fn{});
      return;
    }
  }
  TORCH_CHECK(false, "unsupported dtype ", dtype_name(t));  // the arg checks rule this out
}

// Calls f(S{}, D{}) for a source and a destination dtype; kSrcFp8 / kDstFp8 admit float8_e4m3fn on that side.
template <bool kSrcFp8, bool kDstFp8, typename F>
void dispatch_float_pair(at::ScalarType src, at::ScalarType dst, F&& f) {
  dispatch_float<kSrcFp8>(src, [&](auto s) { dispatch_float<kDstFp8>(dst, [&](auto d) { f(s, d); }); });
}

}  // namespace lrag
