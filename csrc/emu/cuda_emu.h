// The CUDA language and runtime surface our kernels use, for the host compiler: with this header the files in
// csrc/cuda/ compile unchanged with g++ and run on the CPU (the "emulated CUDA" build, lrag_ext._C_emu).
//
// Execution model (csrc/emu/scheduler.cpp): a launch runs its blocks one after another, in a shuffled order; the
// threads of a block are fibers (ucontext) on the calling host thread. A fiber runs until it reaches a
// synchronisation point (__syncthreads, a warp shuffle) or exits; the scheduler then resumes the others, in a
// shuffled order, and releases a barrier or a shuffle only when every thread it needs is there. So:
//   - results never depend on host timing: a launch is a deterministic function of its inputs, the calling
//     thread's seed and how many launches that thread made before;
//   - a missing __syncthreads shows as reads of another thread's not-yet-written (garbage-filled) shared memory,
//     and under ThreadSanitizer as a data race (fibers switch without synchronising; barriers do synchronise);
//   - a barrier reached by only some threads, threads waiting at different barriers, a shuffle with missing or
//     exited lanes, and a deadlock are reported as errors naming the kernel, the file:line and the threads;
//   - launch limits are checked as the driver does (block <= 1024 threads, block.z <= 64, grid.y/z <= 65535,
//     dynamic shared memory <= 48 KiB unless raised with cudaFuncSetAttribute, no empty grid or block);
//   - dynamic shared memory is a heap block of exactly the requested size (AddressSanitizer sees one-past-the-end
//     accesses) filled with seeded garbage before every block.
// What it cannot show: device math (ulps, FMA contraction), races between blocks, memory-model subtleties, speed.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------------
// Qualifiers. __shared__ variables are per block: all fibers of a block run on one host thread and blocks run one
// at a time on it, so a thread_local static is exactly one copy per running block.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// ---------------------------------------------------------------------------------------------------------------
// Vector types and launch geometry.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

using cudaStream_t = struct lrag_emu_stream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace lrag_emu {

// The emulated device: sm_90-like limits, 132 SMs (an H100/H200 SXM) unless LRAG_EMU_SMS says otherwise.
constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxOptInDynamicSmem = 227 * 1024;
int device_sm_count();

// What the currently running fiber sees as its built-in variables.
struct ThreadView {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned char* dynamic_smem;
};
const ThreadView& current();

// Synchronisation points, called from kernel code on a fiber.
void syncthreads(const char* file, int line);
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width, const char* file, int line);

// Runs `body` as every thread of every block of the launch (throws lrag_emu::Error on a launch or sync fault).
struct LaunchConfig {
  const void* kernel;
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t dynamic_smem;
};
void run_grid(const LaunchConfig& cfg, const std::function<void()>& body);

// Per-kernel dynamic shared memory limit, as raised by cudaFuncSetAttribute.
void set_max_dynamic_smem(const void* kernel, int bytes);

// Parameters are copied once per launch, converted to the kernel's parameter types (as CUDA copies them into
// the parameter space), and every thread calls the kernel with that same copy.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "LRAG_LAUNCH: wrong number of kernel arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_grid(cfg, [&] { std::apply(kernel, params); });
  }
};

template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
                         const char* name, const char* file, int line) {
  return Launch<P...>{kernel, LaunchConfig{reinterpret_cast<const void*>(kernel), name, file, line, grid, block, smem}};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace lrag_emu

// ---------------------------------------------------------------------------------------------------------------
// Built-in variables and intrinsics.
#define threadIdx (::lrag_emu::current().thread_idx)
#define blockIdx (::lrag_emu::current().block_idx)
#define blockDim (::lrag_emu::current().block_dim)
#define gridDim (::lrag_emu::current().grid_dim)
#define warpSize (::lrag_emu::kWarpSize)
#define __syncthreads() ::lrag_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::lrag_emu::shfl_xor_at((mask), (var), (lane_mask), __FILE__, __LINE__, ##__VA_ARGS__)

namespace lrag_emu {
template <typename T>
T shfl_xor_at(unsigned mask, T var, int lane_mask, const char* file, int line, int width = kWarpSize) {
  return from_bits<T>(shuffle_xor(mask, to_bits(var), lane_mask, width, file, line));
}
}  // namespace lrag_emu

inline int __float_as_int(float f) { return lrag_emu::from_bits<int>(lrag_emu::to_bits(f)); }
inline unsigned __float_as_uint(float f) { return lrag_emu::from_bits<unsigned>(lrag_emu::to_bits(f)); }
inline float __int_as_float(int i) { return lrag_emu::from_bits<float>(lrag_emu::to_bits(i)); }
inline float __uint_as_float(unsigned u) { return lrag_emu::from_bits<float>(lrag_emu::to_bits(u)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// Atomics: a compare-and-swap loop, so that ThreadSanitizer sees an atomic access, not a race.
inline int atomicMax(int* address, int val) {
  int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < val && !__atomic_compare_exchange_n(address, &old, val, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_RELAXED); }

// CUDA's min/max: overloads for any two arithmetic types (the device library's mixed-type overloads promote).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime API used by the host code.
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// The launch syntax of csrc/cuda: LRAG_LAUNCH(kernel, grid, block, smem, stream)(args...).
#define LRAG_LAUNCH(kernel, grid, block, smem, stream) \
  ::lrag_emu::make_launch((kernel), dim3(grid), dim3(block), (smem), (stream), #kernel, __FILE__, __LINE__)
