// The compiled module lrag_ext._C: every op schema (one TORCH_LIBRARY block) and the host-side objects
// exposed with pybind11. Kernels register their implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu.
// The CMake build (a plain C++ library for C++ consumers) defines LRAG_NO_PYTHON and keeps only the schemas.
#include <torch/library.h>
#ifndef LRAG_NO_PYTHON
#include <torch/extension.h>
#endif

#include "slot_allocator.h"

#ifndef LRAG_TORCH_VERSION
#define LRAG_TORCH_VERSION "unknown"
#endif
#ifndef LRAG_CUDA_VERSION
#define LRAG_CUDA_VERSION ""
#endif
#ifndef LRAG_CUDA_ARCHS
#define LRAG_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(lrag_ext, m) {
  // For each stream b: the top-k logical ids in [lo[b], hi[b]) of its paged embedding history by cosine
  // similarity dot(q, e) / ((|q| + 1e-8)(|e| + 1e-8)) with queries[b]; scores float32 descending, ties to the
  // lower id, padded with (-inf, -1) when fewer than k ids are eligible.
  m.def("cosine_topk(Tensor queries, Tensor pages, Tensor page_table, Tensor lo, Tensor hi, int k) -> (Tensor, Tensor)");
  // The LatentAE encoder's tail, fused: GroupNorm(groups, eps) -> SiLU -> global average pool -> Linear ->
  // L2-normalise (z / max(|z|, 1e-12)); feat [N, C, H, W] (NCHW or channels-last) -> [N, D] float32.
  m.def("embed_head(Tensor feat, Tensor gn_weight, Tensor gn_bias, Tensor fc_weight, Tensor fc_bias, int groups, float eps) -> Tensor");
  // The light embedder, fused: adaptive-average-pool each frame to grid x grid (adaptive_avg_pool2d bins) ->
  // flatten channel-major -> Linear -> L2-normalise; x [N, C, H, W] -> [N, D] float32.
  m.def("pooled_embed(Tensor x, Tensor weight, Tensor bias, int grid) -> Tensor");
  // Paged KV pool [num_slots, layers, 2, tokens, heads, head_dim]: pool[slots[i], l, 0|1] = src_k|src_v[l, i],
  // cast to the pool dtype; slots[i] == -1 skips frame i.
  m.def("write_kv(Tensor(a!) pool, Tensor src_k, Tensor src_v, Tensor slots) -> ()");
  // For every slots[b, j] != -1 and every layer l: dst_v[l, b, dst_frame[b, j]] = pool[slots[b, j], l, 1] and
  // dst_k[l, b, dst_frame[b, j]] = pool[slots[b, j], l, 0] with its first rope_temporal_pairs RoPE pairs
  // (adjacent dims 2i, 2i+1) rotated by delta[b, j] * rope_theta^(-i / rope_temporal_pairs), in float64.
  m.def("gather_kv(Tensor pool, Tensor slots, Tensor(a!) dst_k, Tensor(b!) dst_v, Tensor dst_frame, "
        "Tensor delta, int rope_temporal_pairs, float rope_theta) -> ()");
}

#ifndef LRAG_NO_PYTHON
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = LRAG_TORCH_VERSION;
#ifdef LRAG_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = LRAG_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  std::vector<std::string> archs;
  std::string all = LRAG_CUDA_ARCHS, cur;
  for (char c : all + ";") {
    if (c == ';' || c == ' ') {
      if (!cur.empty()) archs.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  info["cuda_archs"] = archs;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrag_ext compiled kernels (ops are registered under torch.ops.lrag_ext)";
  m.def("build_info", &build_info,
        "Build facts: torch_version it was compiled against, cuda (bool), cuda_version, cuda_archs, openmp.");
  lrag::bind_slot_allocator(m);
}
#endif  // LRAG_NO_PYTHON
