// C++ consumer test of lrag::SlotAllocator (the paged KV pool's allocator), without Python: capacity errors,
// all-or-nothing frees, stream release, and a multi-threaded hammer that checks no slot is ever handed to two
// owners and none leaks.
#include "slot_allocator.h"

#include <atomic>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

template <typename E, typename F>
void expect_throw(F&& f, const std::string& needle, const char* what) {
  try {
    f();
  } catch (const E& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what);
    return;
  }
  expect(false, what);
}

}  // namespace

int main() {
  lrag::SlotAllocator a(10);
  const std::vector<int64_t> got = a.allocate(7);
  expect(got.size() == 7 && got[0] == 0 && a.num_free() == 3, "allocate 7 of 10");
  expect_throw<std::runtime_error>([&] { a.allocate(5); }, "asked for 5 slots, 3 of 10 are free", "capacity error");
  expect(a.num_free() == 3, "failed allocate changes nothing");
  a.free({got[0]});
  expect_throw<std::invalid_argument>([&] { a.free({got[1], got[0]}); }, "is not allocated", "double free");
  expect(a.is_allocated(got[1]), "failed free frees nothing");
  expect_throw<std::out_of_range>([&] { a.free({10}); }, "out of range", "free out of range");
  a.allocate(2, 5);
  expect(a.stream_slots(5).size() == 2 && a.release_stream(5) == 2 && a.stream_slots(5).empty(), "streams");

  // Hammer: 8 threads allocate and free; an owner table catches a slot handed out twice.
  const int64_t n = 64;
  lrag::SlotAllocator h(n);
  std::vector<std::atomic<int>> owner(n);
  for (auto& o : owner) o.store(-1);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<int64_t> mine;
      for (int round = 0; round < 2000; ++round) {
        if (!mine.empty() && rng() % 2) {
          const size_t k = 1 + rng() % mine.size();
          std::vector<int64_t> out(mine.end() - k, mine.end());
          mine.resize(mine.size() - k);
          for (int64_t s : out) {
            int me = t;
            if (!owner[s].compare_exchange_strong(me, -1)) ++errors;
          }
          h.free(out);
        } else {
          std::vector<int64_t> in;
          try {
            in = h.allocate(1 + rng() % 6, t);
          } catch (const std::runtime_error&) {
            continue;
          }
          for (int64_t s : in) {
            int none = -1;
            if (!owner[s].compare_exchange_strong(none, t)) ++errors;
          }
          mine.insert(mine.end(), in.begin(), in.end());
        }
      }
      for (int64_t s : mine) owner[s].store(-1);
      h.free(mine);
    });
  }
  for (auto& th : threads) th.join();
  expect(errors.load() == 0, "no slot handed to two owners");
  expect(h.num_free() == n, "no slot leaked");

  if (failures == 0) std::printf("SlotAllocator: OK\n");
  return failures == 0 ? 0 : 1;
}
