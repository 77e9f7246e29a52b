// Kernels with deliberate defects, and their correct twins, for testing the CUDA emulator itself
// (tests/test_cuda_emulator.py builds this file with csrc/emu/scheduler.cpp into a small shared library).
// Written exactly as kernels in csrc/cuda are (CUDA syntax through csrc/emu/cuda_emu.h, launches through
// LRAG_LAUNCH), so each case shows what the emulator reports for that defect in a real kernel.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu/scheduler.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(lrag_emu::current().dynamic_smem);
}

// Tree reduction in shared memory: out[block] = sum(in[block * kThreads + t]). With kBarrier false, the barrier
// between the store and the first read is missing.
template <bool kBarrier>
__global__ void block_sum(const float* in, float* out) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  if (kBarrier) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Warp sum by xor-shuffles; with kSkipLane, lane 3 does not take part.
template <bool kSkipLane>
__global__ void warp_sum(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (!kSkipLane || (threadIdx.x & 31) != 3) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  out[threadIdx.x] = v;
}

// Two half-warps shuffle independently (disjoint masks): legal, and each sums its own 16 lanes.
__global__ void half_warp_sums(const float* in, float* out) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  float v = in[threadIdx.x];
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  out[threadIdx.x] = v;
}

__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void early_exit_then_barrier(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void two_barriers(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_in_two_places(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Writes one element past the end of its dynamic shared memory (AddressSanitizer builds report it).
__global__ void smem_one_past_end(float* out, int n) {
  float* s = dynamic_smem<float>();
  s[threadIdx.x + 1] = 1.0f;  // thread n-1 writes s[n]
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % n];
}

__global__ void noop(float*) {}

bool close(float a, float b) { return std::abs(a - b) <= 1e-3f * (1.0f + std::abs(b)); }

// Runs a case; returns "" when it completed and its result is right, else what went wrong.
std::string run(const std::string& name) {
  cudaStream_t stream = nullptr;
  const int blocks = 6;
  std::vector<float> in(blocks * kThreads), out(blocks * kThreads, 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i * 37) % 101) / 7.0f;
  try {
    if (name == "block_sum" || name == "block_sum_without_barrier") {
      auto* k = name == "block_sum" ? block_sum<true> : block_sum<false>;
      LRAG_LAUNCH(k, blocks, kThreads, kThreads * sizeof(float), stream)(in.data(), out.data());
      for (int b = 0; b < blocks; ++b) {
        float want = 0.0f;
        for (int t = 0; t < kThreads; ++t) want += in[b * kThreads + t];
        if (!close(out[b], want)) return "wrong result: block " + std::to_string(b) + " sum " + std::to_string(out[b]) +
                                        ", expected " + std::to_string(want);
      }
    } else if (name == "warp_sum" || name == "warp_sum_missing_lane") {
      auto* k = name == "warp_sum" ? warp_sum<false> : warp_sum<true>;
      LRAG_LAUNCH(k, 1, 64, 0, stream)(in.data(), out.data());
      for (int t = 0; t < 64; ++t) {
        float want = 0.0f;
        for (int l = 0; l < 32; ++l) want += in[t / 32 * 32 + l];
        if (!close(out[t], want)) return "wrong result at thread " + std::to_string(t);
      }
    } else if (name == "half_warp_sums") {
      LRAG_LAUNCH(half_warp_sums, 1, 64, 0, stream)(in.data(), out.data());
      for (int t = 0; t < 64; ++t) {
        float want = 0.0f;
        for (int l = 0; l < 16; ++l) want += in[t / 16 * 16 + l];
        if (!close(out[t], want)) return "wrong result at thread " + std::to_string(t);
      }
    } else if (name == "fault_then_ok") {  // a launch that fails mid-block, then a good one on the same thread
      if (run("barrier_in_branch").empty()) return "the faulty launch did not fail";
      return run("block_sum");
    } else if (name == "barrier_in_branch") {
      LRAG_LAUNCH(barrier_in_branch, 1, 64, 0, stream)(out.data());
    } else if (name == "early_exit_then_barrier") {
      LRAG_LAUNCH(early_exit_then_barrier, 1, 64, 0, stream)(out.data());
    } else if (name == "two_barriers") {
      LRAG_LAUNCH(two_barriers, 1, 64, 0, stream)(out.data());
    } else if (name == "shuffle_in_two_places") {
      LRAG_LAUNCH(shuffle_in_two_places, 1, 64, 0, stream)(out.data());
    } else if (name == "smem_one_past_end") {
      LRAG_LAUNCH(smem_one_past_end, 1, 64, 64 * sizeof(float), stream)(out.data(), 64);
    } else if (name == "block_too_large") {
      LRAG_LAUNCH(noop, 1, 1025, 0, stream)(out.data());
    } else if (name == "grid_y_too_large") {
      LRAG_LAUNCH(noop, dim3(1, 65536), 32, 0, stream)(out.data());
    } else if (name == "empty_grid") {
      LRAG_LAUNCH(noop, 0, 32, 0, stream)(out.data());
    } else if (name == "smem_over_default_limit") {
      LRAG_LAUNCH(noop, 1, 32, 48 * 1024 + 4, stream)(out.data());
    } else if (name == "smem_over_default_limit_raised") {
      if (cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) != cudaSuccess) {
        return "cudaFuncSetAttribute failed";
      }
      LRAG_LAUNCH(noop, 1, 32, 48 * 1024 + 4, stream)(out.data());
      cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
    } else {
      return "unknown case " + name;
    }
  } catch (const lrag_emu::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// C ABI for ctypes: runs case `name` with the emulator seeded by `seed`; writes the outcome ("" = success) to
// `msg` (at most `cap` bytes, NUL-terminated).
extern "C" void lrag_emu_selftest(const char* name, unsigned long long seed, char* msg, size_t cap) {
  lrag_emu::Options o;
  o.seed = seed;
  lrag_emu::set_options(o);
  const std::string r = run(name);
  std::snprintf(msg, cap, "%s", r.c_str());
}
