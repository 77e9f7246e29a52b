// Ranking keys for top-k selection, shared by the CPU and CUDA kernels of cosine_topk.
//
// A candidate (score, id) is packed into one uint64 so that "better" is a single unsigned comparison:
//   key = orderable(score) << 32 | (0xFFFFFFFF - id)
// orderable() maps float32 bits onto uint32 monotonically (-inf < ... < +inf), and every NaN to 0xFFFFFFFF,
// i.e. above +inf, the order torch.sort(descending=True) uses. The low word makes the lower id win a tie.
// Key 0 is never produced by a real candidate (it would need orderable() == 0, a negative NaN, which is
// canonicalised), so it serves as the "empty" sentinel that decodes to id -1, score -inf.
// Ids must be < 2^32 - 1; the op limits logical ids to int32 range.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/common.h"

namespace lrag {

constexpr uint64_t kEmptyKey = 0;

LRAG_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LRAG_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

LRAG_HD uint32_t orderable(float score) {
  if (score != score) return 0xFFFFFFFFu;  // NaN ranks first, like torch.sort(descending=True)
  if (score == 0.0f) score = 0.0f;         // -0 ties with +0, as in torch.sort
  const uint32_t u = float_bits(score);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LRAG_HD float from_orderable(uint32_t o) {
  if (o == 0xFFFFFFFFu) return bits_float(0x7FC00000u);  // canonical quiet NaN
  return bits_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

LRAG_HD uint64_t make_key(float score, int64_t id) {
  return (static_cast<uint64_t>(orderable(score)) << 32) | (0xFFFFFFFFull - static_cast<uint64_t>(id));
}

// Decodes a key into (score, id); the empty key gives (-inf, -1).
LRAG_HD void decode_key(uint64_t key, float* score, int64_t* id) {
  if (key == kEmptyKey) {
    *score = -std::numeric_limits<float>::infinity();
    *id = -1;
    return;
  }
  *score = from_orderable(static_cast<uint32_t>(key >> 32));
  *id = static_cast<int64_t>(0xFFFFFFFFull - (key & 0xFFFFFFFFull));
}

// Cosine similarity with the reference's epsilon: dot / ((|q| + eps)(|e| + eps)).
constexpr float kCosineEps = 1e-8f;

}  // namespace lrag
