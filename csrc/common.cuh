// Small shared helpers for the CUDA kernels of fastlm: input checks, dtype dispatch,
// 16-byte vector loads/stores and warp/block reductions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "device.cuh"

namespace fastlm {

#define FASTLM_CHECK_CUDA(t, name) TORCH_CHECK((t).is_cuda(), name " must be a CUDA tensor, got ", (t).device())
#define FASTLM_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                           \
  TORCH_CHECK((a).device() == (b).device(), name_a " and " name_b " must be on the same device, got ", \
              (a).device(), " and ", (b).device())
#define FASTLM_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), name " must have dtype ", dt, ", got ", (t).scalar_type())

// Dispatch over the three floating dtypes the kernels support; `scalar_t` is the CUDA type
// (float, __half, __nv_bfloat16).
#define FASTLM_DISPATCH_FLOAT(dtype, name, ...)                                         \
  [&] {                                                                                 \
    switch (dtype) {                                                                    \
      case at::ScalarType::Float: {                                                     \
        using scalar_t = float;                                                         \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::Half: {                                                      \
        using scalar_t = __half;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::BFloat16: {                                                  \
        using scalar_t = __nv_bfloat16;                                                 \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      default:                                                                          \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16)"); \
    }                                                                                   \
  }()

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace fastlm
