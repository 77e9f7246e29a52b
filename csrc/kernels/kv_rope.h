// Temporal RoPE re-positioning of stored keys, shared by the CPU and CUDA kernels of gather_kv.
//
// Wan's RoPE: head_dim/2 complex pairs formed from adjacent real dims (2i, 2i+1); the first `pairs` of them
// are the temporal axis, with frequencies omega_j = 1 / theta^(2j / (2 * pairs)), j = 0..pairs-1 (Wan's
// rope_params). Moving a key from temporal position a to b multiplies temporal pair j by exp(i (b - a) omega_j).
// Everything here is float64, like Wan's own rope_apply, so the result is exact after the cast back.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.h"

namespace lrag {

// Temporal pairs of Wan's split [c - 2(c//3) | c//3 | c//3] of c = head_dim / 2 pairs (22 for head_dim 128).
LRAG_HD int64_t wan_temporal_pairs(int64_t head_dim) {
  const int64_t c = head_dim / 2;
  return c - 2 * (c / 3);
}

// omega_j, computed as Wan does: 1.0 / theta^(arange(0, 2n, 2)[j] / (2n)) in float64.
LRAG_HD double rope_inv_freq(int64_t j, int64_t pairs, double theta) {
  return 1.0 / pow(theta, static_cast<double>(2 * j) / static_cast<double>(2 * pairs));
}

// (yr + i yi) = (xr + i xi) * (c + i s): torch's complex multiply, in float64.
LRAG_HD void rotate_pair(double xr, double xi, double c, double s, double* yr, double* yi) {
  *yr = xr * c - xi * s;
  *yi = xr * s + xi * c;
}

}  // namespace lrag
