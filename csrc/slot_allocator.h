// Slot allocator of the paged KV pool: hands out indices of pool slots (one slot = one latent frame's K and V
// for all layers). It never touches tensor data. Thread-safe: every method takes one mutex, so a retrieval
// memory may allocate and free from several threads.
#pragma once

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <pybind11/pybind11.h>

namespace lrag {

class SlotAllocator {
 public:
  // A pool of `num_slots` slots, all free. Throws std::invalid_argument when num_slots < 0.
  explicit SlotAllocator(int64_t num_slots);

  // All-or-nothing: `n` free slots (lowest free first on a fresh pool), tagged with `stream`. Throws
  // std::runtime_error naming how many were asked for and how many are free when fewer than n are free,
  // std::invalid_argument when n < 0.
  std::vector<int64_t> allocate(int64_t n, int64_t stream = 0);

  // All-or-nothing: frees every slot of `slots`. Throws (freeing nothing) when a slot is out of range, not
  // allocated, or listed twice.
  void free(const std::vector<int64_t>& slots);

  // Frees every slot tagged with `stream`; returns how many were freed (0 for an unknown stream).
  int64_t release_stream(int64_t stream);

  // Slots currently tagged with `stream`, ascending.
  std::vector<int64_t> stream_slots(int64_t stream) const;

  bool is_allocated(int64_t slot) const;  // throws std::out_of_range for a slot outside [0, num_slots)
  int64_t num_free() const;
  int64_t num_slots() const { return num_slots_; }

 private:
  void check_slot(int64_t slot, const char* what) const;
  void free_locked(const std::vector<int64_t>& slots);

  const int64_t num_slots_;
  mutable std::mutex mutex_;
  std::vector<int64_t> free_list_;  // a stack; back() is handed out next
  std::vector<int64_t> owner_;      // owner_[slot] = stream, or kFree
  std::unordered_map<int64_t, int64_t> stream_count_;  // stream -> number of slots it holds
};

// Registers lrag_ext._C.SlotAllocator (called from the PYBIND11_MODULE in lrag_ext.cpp).
void bind_slot_allocator(pybind11::module_& m);

}  // namespace lrag
