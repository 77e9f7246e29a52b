// Slot allocator of the paged KV pool (see slot_allocator.h) and its pybind11 binding.
#include "slot_allocator.h"

#include <torch/extension.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace lrag {
namespace {
constexpr int64_t kFree = -1;
}

SlotAllocator::SlotAllocator(int64_t num_slots) : num_slots_(num_slots) {
  if (num_slots < 0) throw std::invalid_argument("num_slots must be >= 0, got " + std::to_string(num_slots));
  free_list_.reserve(static_cast<size_t>(num_slots));
  for (int64_t s = num_slots - 1; s >= 0; --s) free_list_.push_back(s);  // slot 0 is handed out first
  owner_.assign(static_cast<size_t>(num_slots), kFree);
}

std::vector<int64_t> SlotAllocator::allocate(int64_t n, int64_t stream) {
  if (n < 0) throw std::invalid_argument("allocate: n must be >= 0, got " + std::to_string(n));
  if (stream < 0) throw std::invalid_argument("allocate: stream must be >= 0, got " + std::to_string(stream));
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t avail = static_cast<int64_t>(free_list_.size());
  if (n > avail) {
    throw std::runtime_error("SlotAllocator out of slots: asked for " + std::to_string(n) + " slots, " +
                             std::to_string(avail) + " of " + std::to_string(num_slots_) + " are free");
  }
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[i] = free_list_.back();
    free_list_.pop_back();
    owner_[out[i]] = stream;
  }
  if (n > 0) stream_count_[stream] += n;
  return out;
}

void SlotAllocator::check_slot(int64_t slot, const char* what) const {
  if (slot < 0 || slot >= num_slots_) {
    throw std::out_of_range(std::string(what) + ": slot " + std::to_string(slot) + " is out of range [0, " +
                            std::to_string(num_slots_) + ")");
  }
}

void SlotAllocator::free_locked(const std::vector<int64_t>& slots) {
  // Validate everything first so that a bad call frees nothing.
  std::vector<int64_t> sorted(slots);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    check_slot(sorted[i], "free");
    if (i > 0 && sorted[i] == sorted[i - 1]) {
      throw std::invalid_argument("free: slot " + std::to_string(sorted[i]) + " is listed more than once");
    }
    if (owner_[sorted[i]] == kFree) {
      throw std::invalid_argument("free: slot " + std::to_string(sorted[i]) +
                                  " is not allocated (double free?)");
    }
  }
  for (int64_t s : slots) {
    auto it = stream_count_.find(owner_[s]);
    if (--it->second == 0) stream_count_.erase(it);
    owner_[s] = kFree;
    free_list_.push_back(s);
  }
}

void SlotAllocator::free(const std::vector<int64_t>& slots) {
  std::lock_guard<std::mutex> lock(mutex_);
  free_locked(slots);
}

int64_t SlotAllocator::release_stream(int64_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stream_count_.find(stream) == stream_count_.end()) return 0;
  std::vector<int64_t> mine;
  for (int64_t s = 0; s < num_slots_; ++s)
    if (owner_[s] == stream) mine.push_back(s);
  free_locked(mine);
  return static_cast<int64_t>(mine.size());
}

std::vector<int64_t> SlotAllocator::stream_slots(int64_t stream) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> mine;
  if (stream_count_.find(stream) == stream_count_.end()) return mine;
  for (int64_t s = 0; s < num_slots_; ++s)
    if (owner_[s] == stream) mine.push_back(s);
  return mine;
}

bool SlotAllocator::is_allocated(int64_t slot) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_slot(slot, "is_allocated");
  return owner_[slot] != kFree;
}

int64_t SlotAllocator::num_free() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(free_list_.size());
}

void bind_slot_allocator(pybind11::module_& m) {
  namespace py = pybind11;
  // The GIL is released in every method: they only take the allocator's own mutex, so Python threads can
  // use one allocator concurrently without serialising on the GIL.
  py::class_<SlotAllocator>(m, "SlotAllocator",
                            "Hands out slot indices of a paged KV pool (one slot = one frame's K and V for all "
                            "layers). Thread-safe; never touches tensor data.")
      .def(py::init<int64_t>(), py::arg("num_slots"), "A pool of num_slots free slots (num_slots >= 0).")
      .def("allocate", &SlotAllocator::allocate, py::arg("n"), py::arg("stream") = 0,
           py::call_guard<py::gil_scoped_release>(),
           "All-or-nothing: n free slots tagged with stream (>= 0). RuntimeError naming the number asked for "
           "and the number free when fewer than n are free.")
      .def("free", &SlotAllocator::free, py::arg("slots"), py::call_guard<py::gil_scoped_release>(),
           "All-or-nothing: frees the slots. ValueError on a double free or a slot listed twice, IndexError on "
           "a slot outside [0, num_slots); nothing is freed then.")
      .def("release_stream", &SlotAllocator::release_stream, py::arg("stream"),
           py::call_guard<py::gil_scoped_release>(), "Frees every slot of stream; returns how many.")
      .def("stream_slots", &SlotAllocator::stream_slots, py::arg("stream"),
           py::call_guard<py::gil_scoped_release>(), "The slots held by stream, ascending.")
      .def("is_allocated", &SlotAllocator::is_allocated, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_free", &SlotAllocator::num_free)
      .def_property_readonly("num_slots", &SlotAllocator::num_slots)
      .def("__repr__", [](const SlotAllocator& a) {
        return "SlotAllocator(num_slots=" + std::to_string(a.num_slots()) + ", num_free=" +
               std::to_string(a.num_free()) + ")";
      });
}

}  // namespace lrag
