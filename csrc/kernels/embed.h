// Framework-free math shared by the CPU and CUDA kernels of embed_head and pooled_embed.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.h"

namespace lrag {

// F.normalize's clamp: z / max(|z|, eps), as the reference LatentAE.encode(normalize=True) does.
constexpr float kNormalizeEps = 1e-12f;

LRAG_HD float silu(float v) { return v / (1.0f + expf(-v)); }

// The bins of adaptive_avg_pool2d along an axis of `size` split into `grid` bins:
// bin i = [floor(i * size / grid), ceil((i + 1) * size / grid)).
LRAG_HD int64_t bin_start(int64_t i, int64_t size, int64_t grid) { return (i * size) / grid; }
LRAG_HD int64_t bin_end(int64_t i, int64_t size, int64_t grid) { return ((i + 1) * size + grid - 1) / grid; }

}  // namespace lrag
