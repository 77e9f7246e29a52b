// CPU kernel of lrag_ext::cosine_topk.
//
// Work is split into tasks of up to `chunk` consecutive eligible entries of one stream, so a single stream
// with a long history still uses every thread. Each task scores its entries (dot product and the entry's
// norm in one pass over the entry) and keeps its best min(k, chunk) keys; a second parallel pass merges the
// partial lists of each stream. Both passes select with nth_element + sort on the packed keys of
// kernels/topk_key.h, so ties resolve to the lower logical id exactly as in the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <vector>

#include "cosine_topk_common.h"
#include "kernels/topk_key.h"

namespace lrag {
namespace {

// Function multiversioning: one binary, the best of AVX-512 / AVX2+FMA / baseline chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LRAG_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LRAG_MULTIVERSION
#endif

// dot(q, e) and |e|^2 in one pass over e, accumulated in float32.
LRAG_MULTIVERSION void dot_sumsq_f32(const float* q, const float* e, int64_t n, float* dot, float* sumsq) {
  float d = 0.f, s = 0.f;
#pragma omp simd reduction(+ : d, s)
  for (int64_t i = 0; i < n; ++i) {
    d += q[i] * e[i];
    s += e[i] * e[i];
  }
  *dot = d;
  *sumsq = s;
}

LRAG_MULTIVERSION void dot_sumsq_bf16(const float* q, const uint16_t* e, int64_t n, float* dot, float* sumsq) {
  float d = 0.f, s = 0.f;
#pragma omp simd reduction(+ : d, s)
  for (int64_t i = 0; i < n; ++i) {
    const float x = bits_float(static_cast<uint32_t>(e[i]) << 16);  // bfloat16 is the top half of a float32
    d += q[i] * x;
    s += x * x;
  }
  *dot = d;
  *sumsq = s;
}

// float16 -> float32 conversion is not a shift, so convert a tile first and reuse the float32 kernel.
void dot_sumsq_f16(const float* q, const c10::Half* e, int64_t n, float* dot, float* sumsq) {
  constexpr int64_t kTile = 256;
  float tile[kTile];
  float d = 0.f, s = 0.f;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t m = std::min(kTile, n - i0);
    for (int64_t i = 0; i < m; ++i) tile[i] = static_cast<float>(e[i0 + i]);
    float td, ts;
    dot_sumsq_f32(q + i0, tile, m, &td, &ts);
    d += td;
    s += ts;
  }
  *dot = d;
  *sumsq = s;
}

inline void dot_sumsq(const float* q, const float* e, int64_t n, float* d, float* s) { dot_sumsq_f32(q, e, n, d, s); }
inline void dot_sumsq(const float* q, const c10::BFloat16* e, int64_t n, float* d, float* s) {
  dot_sumsq_bf16(q, reinterpret_cast<const uint16_t*>(e), n, d, s);
}
inline void dot_sumsq(const float* q, const c10::Half* e, int64_t n, float* d, float* s) { dot_sumsq_f16(q, e, n, d, s); }

// Keeps the best `keep` keys of keys[0, n) in keys[0, keep), sorted best first. Returns how many are kept.
int64_t select_best(uint64_t* keys, int64_t n, int64_t keep) {
  keep = std::min(keep, n);
  if (keep < n) std::nth_element(keys, keys + keep, keys + n, std::greater<uint64_t>());
  std::sort(keys, keys + keep, std::greater<uint64_t>());
  return keep;
}

// Value checks of the CPU path: ranges and the page ids they touch. (The CUDA path cannot read device
// values without synchronising, so it clamps instead; see ops.py.)
void check_ranges(const CosineTopkGeometry& g, const int32_t* table, const int64_t* lo, const int64_t* hi) {
  for (int64_t b = 0; b < g.streams; ++b) {
    TORCH_CHECK(lo[b] >= 0, "lo[", b, "] must be >= 0, got ", lo[b]);
    TORCH_CHECK(lo[b] <= hi[b], "lo[", b, "] must be <= hi[", b, "], got lo=", lo[b], " > hi=", hi[b]);
    TORCH_CHECK(hi[b] <= g.capacity, "hi[", b, "] = ", hi[b], " is beyond what page_table can address (",
                g.max_pages, " pages x page_size ", g.page_size, " = ", g.capacity, " ids)");
    if (lo[b] == hi[b]) continue;
    for (int64_t p = lo[b] / g.page_size; p <= (hi[b] - 1) / g.page_size; ++p) {
      const int32_t page = table[b * g.max_pages + p];
      TORCH_CHECK(page >= 0 && page < g.num_pages, "page_table[", b, ", ", p, "] = ", page,
                  " is outside the pool (pages.shape[0] = ", g.num_pages, ")");
    }
  }
}

template <typename T>
void cosine_topk_kernel(const CosineTopkGeometry& g, const float* queries, const T* pages, int64_t page_stride,
                        int64_t slot_stride, const int32_t* table, const int64_t* lo, const int64_t* hi,
                        float* out_scores, int64_t* out_ids) {
  const int64_t B = g.streams, D = g.dim, k = g.k;
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += hi[b] - lo[b];

  // Enough tasks to feed every thread a few times, each big enough to amortise its selection.
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::clamp<int64_t>(ceil_div<int64_t>(std::max<int64_t>(total, 1), 4 * threads), 256, 16384);
  const int64_t keep = std::min(k, chunk);

  std::vector<int64_t> first_task(B + 1, 0);  // tasks of stream b are [first_task[b], first_task[b + 1])
  for (int64_t b = 0; b < B; ++b) first_task[b + 1] = first_task[b] + ceil_div<int64_t>(hi[b] - lo[b], chunk);
  const int64_t tasks = first_task[B];
  std::vector<uint64_t> partial(static_cast<size_t>(tasks * keep), kEmptyKey);

  std::vector<float> qnorm(B);
  for (int64_t b = 0; b < B; ++b) {
    float d, s;
    dot_sumsq_f32(queries + b * D, queries + b * D, D, &d, &s);
    qnorm[b] = std::sqrt(s);
  }

  // Below ~2^18 multiply-adds per thread the fork/join costs more than it saves: run such work inline.
  const int64_t grain = std::max<int64_t>(1, ceil_div<int64_t>(int64_t{1} << 18, chunk * D));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> keys(static_cast<size_t>(chunk));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1;
      const int64_t start = lo[b] + (t - first_task[b]) * chunk;
      const int64_t n = std::min(chunk, hi[b] - start);
      const float* q = queries + b * D;
      const float qden = qnorm[b] + kCosineEps;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t id = start + j;
        const int64_t page = table[b * g.max_pages + id / g.page_size];
        const T* e = pages + page * page_stride + (id % g.page_size) * slot_stride;
        float dot, sumsq;
        dot_sumsq(q, e, D, &dot, &sumsq);
        keys[j] = make_key(dot / (qden * (std::sqrt(sumsq) + kCosineEps)), id);
      }
      const int64_t kept = select_best(keys.data(), n, keep);
      std::copy(keys.begin(), keys.begin() + kept, partial.begin() + t * keep);
    }
  });

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint64_t* list = partial.data() + first_task[b] * keep;
      const int64_t n = (first_task[b + 1] - first_task[b]) * keep;
      const int64_t kept = select_best(list, n, k);
      for (int64_t j = 0; j < k; ++j) decode_key(j < kept ? list[j] : kEmptyKey, out_scores + b * k + j, out_ids + b * k + j);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& queries, const at::Tensor& pages,
                                                   const at::Tensor& page_table, const at::Tensor& lo,
                                                   const at::Tensor& hi, int64_t k) {
  const CosineTopkGeometry g = check_cosine_topk_args(queries, pages, page_table, lo, hi, k);
  const at::Tensor table_c = page_table.contiguous(), lo_c = lo.contiguous(), hi_c = hi.contiguous();
  check_ranges(g, table_c.data_ptr<int32_t>(), lo_c.data_ptr<int64_t>(), hi_c.data_ptr<int64_t>());

  // The pool may be strided over pages and slots; only its embedding dim must be dense.
  const at::Tensor pages_c = pages.stride(2) == 1 ? pages : pages.contiguous();
  const at::Tensor q = queries.to(at::kFloat).contiguous();
  at::Tensor scores, ids;
  std::tie(scores, ids) = empty_topk_results(queries, g);

  LRAG_DISPATCH_FLOAT_TYPES(pages.scalar_type(), "cosine_topk_cpu", [&] {
    cosine_topk_kernel<scalar_t>(g, q.data_ptr<float>(), pages_c.data_ptr<scalar_t>(), pages_c.stride(0),
                                 pages_c.stride(1), table_c.data_ptr<int32_t>(), lo_c.data_ptr<int64_t>(),
                                 hi_c.data_ptr<int64_t>(), scores.data_ptr<float>(), ids.data_ptr<int64_t>());
  });
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrag_ext, CPU, m) { m.impl("cosine_topk", &cosine_topk_cpu); }

}  // namespace lrag
