// Every op schema of lrag_ext, in one place: registered as torch.ops.lrag_ext.* by csrc/lrag_ext.cpp and, for the
// emulated CUDA build (csrc/emu/module.cpp), as torch.ops.lrag_ext_emu.*.
#pragma once

#include <torch/library.h>

namespace lrag {

inline void define_op_schemas(torch::Library& m) {
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
  // cast to the pool dtype; slots[i] == -1 skips frame i. A float8_e4m3fn pool stores x / s with
  // s = pool_scale[slot, l, 0|1] = amax(|x|) / 448 over the finite values of that frame's K (or V) in layer l.
  m.def("write_kv(Tensor(a!) pool, Tensor src_k, Tensor src_v, Tensor slots, Tensor(b!)? pool_scale=None) -> ()");
  // For every slots[b, j] != -1 and every layer l: dst_v[l, b, dst_frame[b, j]] = pool[slots[b, j], l, 1] and
  // dst_k[l, b, dst_frame[b, j]] = pool[slots[b, j], l, 0] with its first rope_temporal_pairs RoPE pairs
  // (adjacent dims 2i, 2i+1) rotated by delta[b, j] * rope_theta^(-i / rope_temporal_pairs), in float64; a
  // float8_e4m3fn pool is dequantised by pool_scale[slot, l, 0|1] first.
  m.def("gather_kv(Tensor pool, Tensor slots, Tensor(a!) dst_k, Tensor(b!) dst_v, Tensor dst_frame, "
        "Tensor delta, int rope_temporal_pairs, float rope_theta, Tensor? pool_scale=None) -> ()");
}

}  // namespace lrag
