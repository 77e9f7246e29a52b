// C++ consumer test: the op is reachable through the dispatcher from a plain C++ program linked against the
// CMake library, and agrees with a brute-force scan (ids exactly, scores within 1e-5).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>
#include <vector>

int main() {
  at::manual_seed(0);
  const int64_t D = 16, page_size = 4, P = 6, k = 5, lo = 3, hi = 21;
  const at::Tensor pages = at::randn({P, page_size, D});
  const at::Tensor table = at::tensor(std::vector<int32_t>{4, 1, 5, 0, 2, 3}).view({1, P});
  const at::Tensor query = at::randn({1, D});

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("lrag_ext::cosine_topk", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&, int64_t)>();
  auto [scores, ids] = op.call(query, pages, table, at::tensor({lo}), at::tensor({hi}), k);

  std::vector<std::pair<double, int64_t>> rows;
  for (int64_t i = lo; i < hi; ++i) {
    const at::Tensor e = pages[table[0][i / page_size].item<int32_t>()][i % page_size].to(at::kDouble);
    const at::Tensor q = query[0].to(at::kDouble);
    const double s = (q.dot(e) / ((q.norm() + 1e-8) * (e.norm() + 1e-8))).item<double>();
    rows.emplace_back(-s, i);
  }
  std::sort(rows.begin(), rows.end());
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = ids[0][j].item<int64_t>();
    const double s = scores[0][j].item<float>();
    if (id != rows[j].second || std::abs(s + rows[j].first) > 1e-5) {
      std::printf("FAIL rank %ld: got (%ld, %f), want (%ld, %f)\n", static_cast<long>(j), static_cast<long>(id), s,
                  static_cast<long>(rows[j].second), -rows[j].first);
      return 1;
    }
  }
  std::printf("cosine_topk via dispatcher: OK\n");
  return 0;
}
