// Geometry and argument checks of cosine_topk, shared by its CPU and CUDA hosts.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <utility>

#include "checks.h"

namespace lrag {

// Bytes of one result: a float32 score and an int64 id.
constexpr int64_t kResultBytes = 12;

struct CosineTopkGeometry {
  int64_t streams;     // B
  int64_t dim;         // D
  int64_t num_pages;   // P
  int64_t page_size;
  int64_t max_pages;   // page_table.shape[1]
  int64_t capacity;    // max_pages * page_size: the logical ids a stream can address
  int64_t k;
};

// Shape, dtype and device checks (no data is read, so this never synchronises a device).
inline CosineTopkGeometry check_cosine_topk_args(const at::Tensor& queries, const at::Tensor& pages,
                                                 const at::Tensor& page_table, const at::Tensor& lo,
                                                 const at::Tensor& hi, int64_t k) {
  check_dim(queries, 2, "queries", "[B, D]");
  check_float_dtype(queries, "queries");
  check_dim(pages, 3, "pages", "[P, page_size, D]");
  TORCH_CHECK(pages.scalar_type() == queries.scalar_type(), "pages must have the dtype of queries (",
              dtype_name(queries.scalar_type()), "), got ", dtype_name(pages.scalar_type()));
  check_same_device(pages, queries, "pages", "queries");
  check_dim(page_table, 2, "page_table", "[B, max_pages]");
  check_dtype(page_table, at::kInt, "page_table");
  check_same_device(page_table, queries, "page_table", "queries");
  check_dim(lo, 1, "lo", "[B]");
  check_dim(hi, 1, "hi", "[B]");
  check_dtype(lo, at::kLong, "lo");
  check_dtype(hi, at::kLong, "hi");
  check_same_device(lo, queries, "lo", "queries");
  check_same_device(hi, queries, "hi", "queries");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);

  CosineTopkGeometry g;
  g.streams = queries.size(0);
  g.dim = queries.size(1);
  g.num_pages = pages.size(0);
  g.page_size = pages.size(1);
  g.max_pages = page_table.size(1);
  g.k = k;
  TORCH_CHECK(g.dim >= 1, "queries.shape[1] (D) must be >= 1, got ", g.dim);
  check_size(pages, 2, g.dim, "pages", "queries.shape[1] (D)");
  TORCH_CHECK(g.page_size >= 1, "pages.shape[1] (page_size) must be >= 1, got ", g.page_size);
  check_size(page_table, 0, g.streams, "page_table", "queries.shape[0] (B)");
  check_size(lo, 0, g.streams, "lo", "queries.shape[0] (B)");
  check_size(hi, 0, g.streams, "hi", "queries.shape[0] (B)");
  // The sizes of empty tensors are arbitrary: products of user sizes are checked for overflow, never wrapped.
  g.capacity = size_product({g.max_pages, g.page_size});
  TORCH_CHECK(g.capacity >= 0 && g.capacity < std::numeric_limits<int32_t>::max(),
              "page_table.shape[1] * page_size must address fewer than 2^31 - 1 logical ids, got ", g.max_pages,
              " pages x page_size ", g.page_size);
  // The results take B * k * 12 bytes (float32 scores, int64 ids): compared without multiplying.
  TORCH_CHECK(g.streams == 0 || k <= std::numeric_limits<int64_t>::max() / kResultBytes / g.streams, "k = ", k,
              " is too large: the [B, k] results of B = ", g.streams, " streams would need B * k * ", kResultBytes,
              " bytes, beyond int64");
  return g;
}

// The [B, k] results (scores float32, ids int64) on the device of `queries`. k is the one size a caller picks
// freely, so a failed allocation is reported naming it (torch's own message names only a byte count).
inline std::pair<at::Tensor, at::Tensor> empty_topk_results(const at::Tensor& queries, const CosineTopkGeometry& g) {
  auto fail = [&](const c10::Error& e) {
    return c10::str("cosine_topk cannot allocate its [B, k] results for k = ", g.k, ", B = ", g.streams, " (",
                    g.streams * g.k * kResultBytes, " bytes): ", e.what_without_backtrace());
  };
  try {
    return {at::empty({g.streams, g.k}, queries.options().dtype(at::kFloat)),
            at::empty({g.streams, g.k}, queries.options().dtype(at::kLong))};
  } catch (const c10::OutOfMemoryError& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, fail(e));
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, fail(e));
  }
}

}  // namespace lrag
