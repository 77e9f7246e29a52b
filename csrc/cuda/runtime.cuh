// The one place where the files of csrc/cuda meet CUDA: kernel launches, dynamic shared memory, the device
// facts and stream/guard/pinned-memory helpers the host code needs, and the op registration.
//
// Built by nvcc it is the CUDA runtime and c10's CUDA helpers. Built by the host compiler with LRAG_CUDA_EMU
// (the emulated build lrag_ext._C_emu, see csrc/emu/cuda_emu.h) the same kernels and host code run on the CPU:
// "device" tensors are CPU tensors, launches run on the calling thread, and the ops register as
// torch.ops.lrag_ext_emu.* (CPU) instead of torch.ops.lrag_ext.* (CUDA). So kernel files never name CUDA's
// launch syntax or c10::cuda directly:
//   LRAG_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...);   // kernel<<<grid, block, smem, stream>>>
//   T* buf = dynamic_smem<T>();                                       // extern __shared__ T buf[]
//   LRAG_CUDA_IMPL(m) { m.impl("op", &op_cuda); }                     // TORCH_LIBRARY_IMPL(lrag_ext, CUDA, m)
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#if defined(LRAG_CUDA_EMU)
#include <c10/util/Float8_e4m3fn.h>

#include "emu/cuda_emu.h"
#else
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#define LRAG_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#endif

namespace lrag {

// The dynamic shared memory of the running block, as T[] (16-byte aligned).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(LRAG_CUDA_EMU)
  return reinterpret_cast<T*>(lrag_emu::current().dynamic_smem);
#else
  extern __shared__ __align__(16) unsigned char lrag_dynamic_smem[];
  return reinterpret_cast<T*>(lrag_dynamic_smem);
#endif
}

// float8_e4m3fn bits -> float. On the GPU through cuda_fp8.h's fp8 -> half conversion (one instruction on
// sm_89+); exact either way: every e4m3 value, subnormals and NaN included, is a half.
__device__ __forceinline__ float fp8_e4m3_to_float(uint8_t bits) {
#if defined(LRAG_CUDA_EMU)
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
#else
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(bits, __NV_E4M3)));
#endif
}

namespace gpu {

#if defined(LRAG_CUDA_EMU)
// The emulated device is the CPU: its tensors are CPU tensors and its "stream" is the calling thread.
constexpr const char* kTensorKind = "CPU (emulated CUDA)";
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
struct Stream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline Stream current_stream() { return {}; }
inline int sm_count() { return lrag_emu::device_sm_count(); }
// Host memory is never "pinned" for the emulated device: every CPU tensor is already device memory.
inline void* mapped_host_pointer(const at::Tensor&) { return nullptr; }
inline void record_host_use(const at::Tensor&, const Stream&) {}
inline void check_launch() {}
#define LRAG_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(lrag_ext_emu, CPU, m)
#else
constexpr const char* kTensorKind = "CUDA";
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = at::cuda::CUDAStream;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The device pointer that maps pinned host memory, or nullptr when `t` is not in pinned (registered) memory.
inline void* mapped_host_pointer(const at::Tensor& t) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, t.data_ptr());
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error of an unknown pointer
    return nullptr;
  }
  return attr.type == cudaMemoryTypeHost ? attr.devicePointer : nullptr;
}

// Keeps a pinned host tensor's block from being reused by the caching host allocator before `stream` is done.
// (A block that did not come from that allocator, e.g. user-registered memory, is the caller's to keep alive.)
inline void record_host_use(const at::Tensor& t, const Stream& stream) {
  if (!t.is_cpu() || t.numel() == 0) return;
  const auto& dp = t.storage().data_ptr();
  at::getHostAllocator(at::kCUDA)->record_event(dp.get(), dp.get_context(), stream.unwrap());
}

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
#define LRAG_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(lrag_ext, CUDA, m)
#endif

}  // namespace gpu
}  // namespace lrag
