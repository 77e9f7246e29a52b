// The compiled module lrag_ext._C_emu: the CUDA ops of csrc/cuda built for the CPU emulator
// (registered as torch.ops.lrag_ext_emu.*, CPU dispatch key) and the emulator's controls.
#include <torch/extension.h>

#include "emu/scheduler.h"
#include "op_schemas.h"

TORCH_LIBRARY(lrag_ext_emu, m) { lrag::define_op_schemas(m); }

namespace {

pybind11::dict stats() {
  const lrag_emu::Stats s = lrag_emu::stats();
  pybind11::dict d;
  d["launches"] = s.launches;
  d["blocks"] = s.blocks;
  d["threads"] = s.threads;
  d["barriers"] = s.barriers;
  d["shuffles"] = s.shuffles;
  return d;
}

void configure(uint64_t seed, const std::string& drop_barrier) {
  lrag_emu::Options o;
  o.seed = seed;
  o.drop_barrier = drop_barrier;
  lrag_emu::set_options(o);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrag_ext's CUDA kernels on the CPU emulator (ops under torch.ops.lrag_ext_emu)";
  pybind11::register_exception<lrag_emu::Error>(m, "EmulatorError", PyExc_RuntimeError);
  m.def("configure", &configure, pybind11::arg("seed") = 0, pybind11::arg("drop_barrier") = "",
        "For launches from the calling thread: the seed of block order, thread interleaving and shared-memory "
        "garbage; drop_barrier='file:line' skips that __syncthreads (fault injection for testing the emulator).");
  m.def("seed", [] { return lrag_emu::options().seed; });
  m.def("drop_barrier", [] { return lrag_emu::options().drop_barrier; });
  m.def("stats", &stats, "Counters since load: launches, blocks, threads, barriers, shuffles.");
  m.def("sm_count", &lrag_emu::device_sm_count, "SMs of the emulated device (132, or $LRAG_EMU_SMS).");
}
