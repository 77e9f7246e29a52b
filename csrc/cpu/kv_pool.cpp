// CPU kernels of lrag_ext::write_kv and lrag_ext::gather_kv (the paged KV pool).
//
// Both ops move whole frames: one work item is one token row [heads, head_dim] of one layer of K or V of one
// frame, and at::parallel_for splits the flat item range, so a handful of frames still uses every thread.
// Rows are copied with memcpy when source and destination dtypes agree and nothing is rotated; otherwise each
// element is converted through float (the rotated temporal pairs through double), which is torch's own cast
// chain. Every value (slot ids, destination frames) is checked before the first byte is written, so a failed
// call leaves the pool and the cache untouched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/kv_rope.h"
#include "kv_pool_common.h"

namespace lrag {
namespace {

// The float value of every float8_e4m3fn bit pattern: decoding through the table is several times faster than
// c10's per-element bit manipulation.
const float* fp8_decode_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) {
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    }
    return t;
  }();
  return table.data();
}

// load_value (kv_pool_common.h) with the fp8 decode by table.
template <typename S>
inline float load(S x, float scale, const float* fp8_table) {
  if constexpr (is_fp8_v<S>) {
    return fp8_table[x.x] * scale;
  } else {
    return load_value(x, scale);
  }
}

// Copies one row of head_dim elements, converting S -> D (fp8 sides scaled by `scale`); the first `rot_pairs`
// pairs are rotated by the (cos, sin) table `cs` (2 doubles per pair).
template <typename S, typename D>
inline void copy_row(const S* src, D* dst, int64_t head_dim, int64_t rot_pairs, const double* cs, float scale) {
  const float* fp8 = is_fp8_v<S> ? fp8_decode_table() : nullptr;
  for (int64_t q = 0; q < rot_pairs; ++q) {
    double yr, yi;
    rotate_pair(static_cast<double>(load(src[2 * q], scale, fp8)), static_cast<double>(load(src[2 * q + 1], scale, fp8)),
                cs[2 * q], cs[2 * q + 1], &yr, &yi);
    // double -> float -> D: the cast chain of torch's float64 .to(D).
    dst[2 * q] = store_value<D>(static_cast<float>(yr), scale);
    dst[2 * q + 1] = store_value<D>(static_cast<float>(yi), scale);
  }
  const int64_t start = 2 * rot_pairs;
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst + start, src + start, sizeof(S) * static_cast<size_t>(head_dim - start));
  } else {
    for (int64_t i = start; i < head_dim; ++i) dst[i] = store_value<D>(load(src[i], scale, fp8), scale);
  }
}

// One frame copy (all layers, K and V): base pointers of layer 0 of K (index 0) and V (index 1).
template <typename S, typename D>
struct FrameJob {
  const S* src[2];
  D* dst[2];
  int64_t rot_pairs;  // temporal pairs of K to rotate (0: plain copy)
  const double* cs;   // [rot_pairs, 2] cos/sin of the rotation angles
  float* scale;       // fp8 pools: pool_scale[slot] ([layers, 2], strides in ScaleStrides); else nullptr
};

struct ScaleStrides {
  int64_t layer = 0, kv = 0;
};

// Runs all jobs. Items are (job, layer, kv, token), each `heads` rows; strides are per side and per kv.
template <typename S, typename D>
void run_jobs(const std::vector<FrameJob<S, D>>& jobs, const KvGeometry& g, const FrameStrides (&ss)[2],
              const FrameStrides (&ds)[2], ScaleStrides sc) {
  // Nothing to move in frames without elements (whose other sizes are then arbitrary: not multiplied).
  if (g.layers == 0 || size_product({g.tokens, g.heads, g.head_dim}) == 0) return;
  const int64_t per_job = g.layers * 2 * g.tokens;
  const int64_t total = static_cast<int64_t>(jobs.size()) * per_job;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.heads * g.head_dim));
  at::parallel_for(0, total, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const FrameJob<S, D>& job = jobs[i / per_job];
      int64_t r = i % per_job;
      const int64_t t = r % g.tokens;
      r /= g.tokens;
      const int64_t kv = r % 2, l = r / 2;
      const S* s = job.src[kv] + l * ss[kv].layer + t * ss[kv].token;
      D* d = job.dst[kv] + l * ds[kv].layer + t * ds[kv].token;
      const int64_t rot = kv == 0 ? job.rot_pairs : 0;
      const float scale = job.scale != nullptr ? job.scale[l * sc.layer + kv * sc.kv] : 1.0f;
      for (int64_t h = 0; h < g.heads; ++h) {
        copy_row(s + h * ss[kv].head, d + h * ds[kv].head, g.head_dim, rot, job.cs, scale);
      }
    }
  });
}

// fp8 write: stores fp8_scale_for(amax) of every (job, layer, kv) of the sources into its pool_scale entry.
template <typename S, typename D>
void store_fp8_scales(const std::vector<FrameJob<S, D>>& jobs, const KvGeometry& g, const FrameStrides (&ss)[2],
                      ScaleStrides sc) {
  at::parallel_for(0, static_cast<int64_t>(jobs.size()) * g.layers * 2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const FrameJob<S, D>& job = jobs[i / (2 * g.layers)];
      const int64_t kv = i % 2, l = (i / 2) % g.layers;
      float amax = 0.0f;
      for (int64_t t = 0; t < g.tokens; ++t) {
        for (int64_t h = 0; h < g.heads; ++h) {
          const S* row = job.src[kv] + l * ss[kv].layer + t * ss[kv].token + h * ss[kv].head;
          for (int64_t c = 0; c < g.head_dim; ++c) amax = fp8_amax_fold(amax, static_cast<float>(row[c]));
        }
      }
      job.scale[l * sc.layer + kv * sc.kv] = fp8_scale_for(amax);
    }
  });
}

// Sources may be any strided view; only their last dim must be dense, else a dense copy is taken.
at::Tensor last_dim_dense(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

void write_kv_cpu(at::Tensor pool, const at::Tensor& src_k, const at::Tensor& src_v, const at::Tensor& slots,
                  const std::optional<at::Tensor>& pool_scale) {
  const KvGeometry g = check_write_kv_args(pool, src_k, src_v, slots);
  const bool fp8 = check_pool_scale(pool, g, pool_scale);
  check_same_device(src_k, pool, "src_k", "pool");
  check_write_kv_aliasing(pool, src_k, src_v, slots, pool_scale);
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* sl = slots_c.data_ptr<int64_t>();
  const int64_t n = slots.size(0);
  std::vector<uint8_t> seen(static_cast<size_t>(g.num_slots), 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(sl[i] >= -1 && sl[i] < g.num_slots, "slots[", i, "] = ", sl[i],
                " is outside the pool: expected -1 (skip) or a slot in [0, pool.shape[0] = ", g.num_slots, ")");
    if (sl[i] < 0) continue;
    TORCH_CHECK(!seen[sl[i]], "slots[", i, "] = ", sl[i], " is listed more than once (a slot may be written once ",
                "per call)");
    seen[sl[i]] = 1;
  }
  const at::Tensor sk = last_dim_dense(src_k), sv = last_dim_dense(src_v);
  const FrameStrides ss[2] = {{sk.stride(0), sk.stride(2), sk.stride(3)}, {sv.stride(0), sv.stride(2), sv.stride(3)}};
  const FrameStrides pool_side{pool.stride(1), pool.stride(3), pool.stride(4)};
  const FrameStrides ds[2] = {pool_side, pool_side};
  const ScaleStrides sc = fp8 ? ScaleStrides{pool_scale->stride(1), pool_scale->stride(2)} : ScaleStrides{};
  dispatch_float_pair<false, true>(sk.scalar_type(), pool.scalar_type(), [&](auto s_tag, auto d_tag) {
    using S = decltype(s_tag);
    using D = decltype(d_tag);
    std::vector<FrameJob<S, D>> jobs;
    for (int64_t i = 0; i < n; ++i) {
      if (sl[i] < 0) continue;
      D* base = static_cast<D*>(pool.data_ptr()) + sl[i] * pool.stride(0);
      float* scale = fp8 ? pool_scale->data_ptr<float>() + sl[i] * pool_scale->stride(0) : nullptr;
      jobs.push_back({{sk.data_ptr<S>() + i * sk.stride(1), sv.data_ptr<S>() + i * sv.stride(1)},
                      {base, base + pool.stride(2)}, 0, nullptr, scale});
    }
    if constexpr (is_fp8_v<D>) store_fp8_scales(jobs, g, ss, sc);
    run_jobs(jobs, g, ss, ds, sc);
  });
}

void gather_kv_cpu(const at::Tensor& pool, const at::Tensor& slots, at::Tensor dst_k, at::Tensor dst_v,
                   const at::Tensor& dst_frame, const at::Tensor& delta, int64_t rope_temporal_pairs,
                   double rope_theta, const std::optional<at::Tensor>& pool_scale) {
  const KvGeometry g =
      check_gather_kv_args(pool, slots, dst_k, dst_v, dst_frame, delta, rope_temporal_pairs, rope_theta);
  const bool fp8 = check_pool_scale(pool, g, pool_scale);
  check_same_device(pool, dst_k, "pool", "dst_k");
  check_gather_kv_aliasing(pool, slots, dst_k, dst_v, dst_frame, delta, pool_scale);
  const int64_t B = slots.size(0), m = slots.size(1), F = dst_k.size(2);
  const at::Tensor slots_c = slots.contiguous(), frame_c = dst_frame.contiguous(), delta_c = delta.contiguous();
  const int64_t* sl = slots_c.data_ptr<int64_t>();
  const int64_t* fr = frame_c.data_ptr<int64_t>();
  const int64_t* dl = delta_c.data_ptr<int64_t>();

  // Value checks, all before any write. A destination frame may receive at most one source per stream:
  // owner[e] is the first earlier entry of e's stream with e's frame (found by sorting each stream's entries by
  // frame, so memory is O(B * m), never O(B * cache_frames), whatever the cache's sizes).
  std::vector<int64_t> owner(static_cast<size_t>(B * m), -1);
  std::vector<std::pair<int64_t, int64_t>> by_frame;  // (frame, j) of one stream's entries that are not skipped
  for (int64_t b = 0; b < B; ++b) {
    by_frame.clear();
    for (int64_t j = 0; j < m; ++j) {
      if (sl[b * m + j] >= 0) by_frame.emplace_back(fr[b * m + j], j);
    }
    std::sort(by_frame.begin(), by_frame.end());
    for (size_t i = 1; i < by_frame.size(); ++i) {
      if (by_frame[i].first != by_frame[i - 1].first) continue;
      const int64_t o = owner[b * m + by_frame[i - 1].second];
      owner[b * m + by_frame[i].second] = o >= 0 ? o : by_frame[i - 1].second;
    }
  }
  std::vector<int64_t> valid;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t e = b * m + j;
      TORCH_CHECK(sl[e] >= -1 && sl[e] < g.num_slots, "slots[", b, ", ", j, "] = ", sl[e],
                  " is outside the pool: expected -1 (skip) or a slot in [0, pool.shape[0] = ", g.num_slots, ")");
      if (sl[e] < 0) continue;
      TORCH_CHECK(fr[e] >= 0 && fr[e] < F, "dst_frame[", b, ", ", j, "] = ", fr[e],
                  " is outside the cache: expected a frame in [0, dst_k.shape[2] = ", F, ")");
      TORCH_CHECK(owner[e] < 0, "dst_frame[", b, ", ", j, "] = ", fr[e], " is also the destination of dst_frame[",
                  b, ", ", owner[e], "]: each cache frame may receive one source per call");
      valid.push_back(e);
    }
  }

  // cos/sin of every (entry, temporal pair) in float64, computed once and shared by all layers and tokens.
  const int64_t tp = rope_temporal_pairs;
  std::vector<double> inv(static_cast<size_t>(tp));
  for (int64_t q = 0; q < tp; ++q) inv[q] = rope_inv_freq(q, tp, rope_theta);
  std::vector<double> cs(valid.size() * static_cast<size_t>(2 * tp));
  for (size_t v = 0; v < valid.size(); ++v) {
    const double d = static_cast<double>(dl[valid[v]]);
    for (int64_t q = 0; q < tp; ++q) {
      cs[v * 2 * tp + 2 * q] = std::cos(d * inv[q]);
      cs[v * 2 * tp + 2 * q + 1] = std::sin(d * inv[q]);
    }
  }

  const FrameStrides pool_side{pool.stride(1), pool.stride(3), pool.stride(4)};
  const FrameStrides ss[2] = {pool_side, pool_side};
  const FrameStrides ds[2] = {{dst_k.stride(0), dst_k.stride(3), dst_k.stride(4)},
                              {dst_v.stride(0), dst_v.stride(3), dst_v.stride(4)}};
  const ScaleStrides sc = fp8 ? ScaleStrides{pool_scale->stride(1), pool_scale->stride(2)} : ScaleStrides{};
  dispatch_float_pair<true, false>(pool.scalar_type(), dst_k.scalar_type(), [&](auto s_tag, auto d_tag) {
    using S = decltype(s_tag);
    using D = decltype(d_tag);
    std::vector<FrameJob<S, D>> jobs;
    for (size_t v = 0; v < valid.size(); ++v) {
      const int64_t e = valid[v], b = e / m;
      const S* base = static_cast<const S*>(pool.data_ptr()) + sl[e] * pool.stride(0);
      float* scale = fp8 ? pool_scale->data_ptr<float>() + sl[e] * pool_scale->stride(0) : nullptr;
      jobs.push_back({{base, base + pool.stride(2)},
                      {dst_k.data_ptr<D>() + b * dst_k.stride(1) + fr[e] * dst_k.stride(2),
                       dst_v.data_ptr<D>() + b * dst_v.stride(1) + fr[e] * dst_v.stride(2)},
                      dl[e] == 0 ? 0 : tp, cs.data() + v * 2 * tp, scale});
    }
    run_jobs(jobs, g, ss, ds, sc);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrag_ext, CPU, m) {
  m.impl("write_kv", &write_kv_cpu);
  m.impl("gather_kv", &gather_kv_cpu);
}

}  // namespace lrag
