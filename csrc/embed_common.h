// Argument checks and geometry of embed_head and pooled_embed, shared by their CPU and CUDA hosts.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace lrag {

// A [N, C, H, W] tensor addressed as x[n * sn + c * sc + p * sp] with p = h * W + w (the pixel index).
// NCHW-contiguous and channels-last tensors both have this form; anything else is made contiguous first.
struct PixelView {
  at::Tensor t;
  int64_t n, c, pixels, sn, sc, sp;
};

inline PixelView pixel_view(const at::Tensor& x) {
  const int64_t H = x.size(2), W = x.size(3);
  const bool flat = H == 1 || W == 1 || x.stride(2) == W * x.stride(3);
  at::Tensor t = flat ? x : x.contiguous();
  const int64_t sp = W == 1 ? t.stride(2) : t.stride(3);
  return {t, t.size(0), t.size(1), H * W, t.stride(0), t.stride(1), sp};
}

inline void check_param(const at::Tensor& p, const at::Tensor& x, int64_t dim, const char* name,
                        const char* shape, const char* x_name) {
  check_dim(p, dim, name, shape);
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), name, " must have the dtype of the input ", x_name, " (",
              dtype_name(x.scalar_type()), "), got ", dtype_name(p.scalar_type()));
  TORCH_CHECK(p.device() == x.device(), name, " must be on the same device as the input ", x_name, " (", x.device(),
              "), got ", p.device());
}

struct EmbedHeadGeometry {
  int64_t n, c, pixels, d, groups;
};

inline EmbedHeadGeometry check_embed_head_args(const at::Tensor& feat, const at::Tensor& gn_weight,
                                               const at::Tensor& gn_bias, const at::Tensor& fc_weight,
                                               const at::Tensor& fc_bias, int64_t groups, double eps) {
  check_dim(feat, 4, "feat", "[N, C, H, W]");
  check_float_dtype(feat, "feat");
  check_param(gn_weight, feat, 1, "gn_weight", "[C]", "feat");
  check_param(gn_bias, feat, 1, "gn_bias", "[C]", "feat");
  check_param(fc_weight, feat, 2, "fc_weight", "[D, C]", "feat");
  check_param(fc_bias, feat, 1, "fc_bias", "[D]", "feat");
  // H x W of an empty batch is arbitrary: the product is checked for overflow, never wrapped.
  EmbedHeadGeometry g{feat.size(0), feat.size(1), size_product({feat.size(2), feat.size(3)}), fc_weight.size(0),
                      groups};
  TORCH_CHECK(g.pixels >= 0, "feat.shape[2] * feat.shape[3] (H x W) overflows int64: ", feat.size(2), " x ",
              feat.size(3));
  TORCH_CHECK(g.c >= 1, "feat.shape[1] (C) must be >= 1, got ", g.c);
  TORCH_CHECK(g.pixels >= 1, "feat must have at least one pixel, got H x W = ", feat.size(2), " x ", feat.size(3));
  check_size(gn_weight, 0, g.c, "gn_weight", "feat.shape[1] (C)");
  check_size(gn_bias, 0, g.c, "gn_bias", "feat.shape[1] (C)");
  check_size(fc_weight, 1, g.c, "fc_weight", "feat.shape[1] (C)");
  TORCH_CHECK(g.d >= 1, "fc_weight.shape[0] (D) must be >= 1, got ", g.d);
  check_size(fc_bias, 0, g.d, "fc_bias", "fc_weight.shape[0] (D)");
  TORCH_CHECK(groups >= 1 && g.c % groups == 0, "groups must be >= 1 and divide C (", g.c, "), got ", groups);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  return g;
}

struct PooledEmbedGeometry {
  int64_t n, c, h, w, grid, k, d;
};

inline PooledEmbedGeometry check_pooled_embed_args(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& bias, int64_t grid) {
  check_dim(x, 4, "x", "[N, C, H, W]");
  check_float_dtype(x, "x");
  check_param(weight, x, 2, "weight", "[D, C * grid * grid]", "x");
  check_param(bias, x, 1, "bias", "[D]", "x");
  PooledEmbedGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), grid, 0, weight.size(0)};
  TORCH_CHECK(g.c >= 1, "x.shape[1] (C) must be >= 1, got ", g.c);
  TORCH_CHECK(grid >= 1 && grid <= g.h && grid <= g.w, "grid must be in [1, min(H, W)] = [1, ",
              std::min(g.h, g.w), "], got ", grid);
  // C of an empty batch is arbitrary: the product is checked for overflow, never wrapped.
  g.k = size_product({g.c, grid, grid});
  TORCH_CHECK(g.k >= 0, "x.shape[1] * grid * grid (C * grid * grid) overflows int64: C = ", g.c, ", grid = ", grid);
  check_size(weight, 1, g.k, "weight", "C * grid * grid");
  TORCH_CHECK(g.d >= 1, "weight.shape[0] (D) must be >= 1, got ", g.d);
  check_size(bias, 0, g.d, "bias", "weight.shape[0] (D)");
  return g;
}

}  // namespace lrag
