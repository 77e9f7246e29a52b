// Control and counters of the CUDA emulator (csrc/emu/scheduler.cpp), for its Python module and tests.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lrag_emu {

// A launch or synchronisation fault found by the emulator (becomes a RuntimeError in Python).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per host thread: set_options/options act on the calling thread's launches.
struct Options {
  uint64_t seed = 0;         // block order, thread interleaving and shared-memory garbage derive from it
  std::string drop_barrier;  // fault injection: skip the __syncthreads whose "file:line" ends with this
};

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
};

void set_options(const Options& o);
int device_sm_count();  // SMs of the emulated device: 132 (an H100/H200 SXM), or $LRAG_EMU_SMS
Options options();
Stats stats();

}  // namespace lrag_emu
