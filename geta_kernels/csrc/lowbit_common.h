// Shared host-side checks for the low-bit kernels (geta::lowbit_linear, geta::unpack_weight).
//
// Included by geta_kernels/csrc/cpu/lowbit_cpu.cpp (g++) and geta_kernels/csrc/cuda/lowbit_cuda.cu (nvcc).
// Same conditions, same words as geta_fx.ops.lowbit (the reference, the contract); messages
// pass only strings to TORCH_CHECK (see quantize_common.h).  Nothing here registers anything.
#pragma once

#include "quantize_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace geta_lowbit {
// Internal linkage, as in quantize_common.h: each library keeps its own copy.
namespace {

using geta_kernels::is_supported_x_dtype;
using geta_kernels::shape_str;

inline int64_t row_bytes(int64_t k, int64_t bits) { return (k + 7) / 8 * bits; }

// packed [n, ceil(k/8)*bits] uint8 (n < 0: any row count) and a one-element float32 scale, both
// on `device`.
inline void check_packed(const char* who, const at::Tensor& packed, const at::Tensor& scale,
                         int64_t bits, int64_t n, int64_t k, const c10::Device& device) {
  TORCH_CHECK(bits >= 2 && bits <= 8, who, ": bits must be in [2, 8], got ", std::to_string(bits));
  TORCH_CHECK(packed.scalar_type() == c10::ScalarType::Byte, who, ": packed must be uint8, got ",
              c10::toString(packed.scalar_type()));
  TORCH_CHECK(packed.dim() == 2, who, ": packed must be 2-D [N, ceil(K/8)*bits], got shape ",
              shape_str(packed.sizes()));
  if (n >= 0) {
    TORCH_CHECK(packed.size(0) == n, who, ": packed has ", std::to_string(packed.size(0)),
                " rows, expected ", std::to_string(n));
  }
  TORCH_CHECK(packed.size(1) == row_bytes(k, bits), who, ": packed rows have ",
              std::to_string(packed.size(1)), " bytes, expected ceil(", std::to_string(k), "/8)*",
              std::to_string(bits), " = ", std::to_string(row_bytes(k, bits)));
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == c10::ScalarType::Float, who,
              ": scale must be float32 with one element, got ", c10::toString(scale.scalar_type()),
              " shape ", shape_str(scale.sizes()));
  TORCH_CHECK(packed.device() == device, who, ": packed is on ", packed.device().str(),
              ", expected ", device.str());
  TORCH_CHECK(scale.device() == device, who, ": scale is on ", scale.device().str(),
              ", expected ", device.str());
}

// unpack_weight's arguments; returns (n, k): rows = shape[0] (1 for a 1-D shape), k the rest.
inline std::pair<int64_t, int64_t> check_unpack_args(const char* who, const at::Tensor& packed,
                                                     const at::Tensor& scale, int64_t bits,
                                                     c10::IntArrayRef shape,
                                                     c10::ScalarType dtype) {
  TORCH_CHECK(is_supported_x_dtype(dtype), who,
              ": dtype must be float32, float16 or bfloat16, got ", c10::toString(dtype));
  TORCH_CHECK(!shape.empty(), who, ": shape must have at least one dim");
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t n = shape.size() >= 2 ? shape[0] : 1;
  const int64_t k = n ? numel / n : 0;
  check_packed(who, packed, scale, bits, n, k, packed.device());
  return {n, k};
}

// lowbit_linear's arguments, everything on x's device.
inline void check_linear_args(const char* who, const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, int64_t bits, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_supported_x_dtype(x.scalar_type()), who,
              ": x must be float32, float16 or bfloat16, got ", c10::toString(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, who, ": x must have at least one dim");
  TORCH_CHECK(x.size(-1) == in_features, who, ": x has ", std::to_string(x.size(-1)),
              " features, expected ", std::to_string(in_features));
  check_packed(who, packed, scale, bits, -1, in_features, x.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    const int64_t n = packed.size(0);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, who, ": bias must be [", std::to_string(n),
                "], got ", shape_str(b.sizes()));
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), who, ": bias dtype ",
                c10::toString(b.scalar_type()), " != x dtype ", c10::toString(x.scalar_type()));
    TORCH_CHECK(b.device() == x.device(), who, ": bias is on ", b.device().str(), ", x on ",
                x.device().str());
  }
}

}  // namespace
}  // namespace geta_lowbit
