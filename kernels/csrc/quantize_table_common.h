// Shared pieces of the geta::quantize.table kernels (CPU: cpu/quantize_table_cpu.cpp, CUDA:
// cuda/quantize_table_cuda.cu).  Contract and reference: geta_fx/ops/quantize_table.py; the
// schema is defined in geta_fx/ops/schema.py.  Nothing here registers anything.
#pragma once

#include "quantize_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define GETA_TABLE_HD __host__ __device__
#else
#define GETA_TABLE_HD
#endif

namespace geta_kernels {
namespace {

// Same conditions, same wording as geta_fx.ops.quantize_table.check_quantize_table_inputs.
inline void check_quantize_table_inputs(const char* op, const at::Tensor& x, const at::Tensor& d,
                                        const at::Tensor& q_m, const at::Tensor& t,
                                        const at::Tensor& scale, const at::Tensor& bounds,
                                        const at::Tensor& base) {
  check_quantize_inputs(op, x, d, q_m, t);
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == c10::ScalarType::Float, op,
              ": scale must be float32 with one element, got ",
              c10::toString(scale.scalar_type()), " ", shape_str(scale.sizes()));
  const char* names[2] = {"bounds", "base"};
  const at::Tensor* tabs[2] = {&bounds, &base};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(tabs[i]->scalar_type() == c10::ScalarType::Int && tabs[i]->dim() == 1, op, ": ",
                names[i], " must be a 1-D int32 tensor, got ",
                c10::toString(tabs[i]->scalar_type()), " ", shape_str(tabs[i]->sizes()));
  }
  TORCH_CHECK(bounds.sizes() == base.sizes() && bounds.numel() >= 1, op, ": bounds ",
              shape_str(bounds.sizes()), " and base ", shape_str(base.sizes()),
              " must have the same non-zero length");
  TORCH_CHECK(bounds.numel() <= (int64_t{1} << 30), op, ": at most 2^30 cells, got ",
              shape_str(bounds.sizes()));
  const char* pnames[3] = {"scale", "bounds", "base"};
  const at::Tensor* ps[3] = {&scale, &bounds, &base};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ps[i]->device() == x.device(), op, ": ", pnames[i], " is on ",
                ps[i]->device().str(), " but x is on ", x.device().str());
  }
}

GETA_TABLE_HD inline int32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

// One element of the contract (geta_fx/ops/quantize_table.py), in float32.
GETA_TABLE_HD inline float table_quantize(float x, float q, float scale, float d, int32_t cells,
                                          const int32_t* bounds, const int32_t* base,
                                          bool is_signed) {
  if (x != x) return x;  // NaN propagates as the input NaN
  const float a = fabsf(x);
  const float m = a < q ? a : q;
  int32_t j = static_cast<int32_t>(m * scale);  // m >= 0: truncation == floor
  j = j < 0 ? 0 : (j > cells - 1 ? cells - 1 : j);
  const int32_t level = base[j] + (float_bits(m) >= bounds[j] ? 1 : 0);
  const float mag = static_cast<float>(level) * d;
  if (is_signed) return x < 0.f ? -mag : mag;
  return x > 0.f ? mag : 0.f;
}

}  // namespace
}  // namespace geta_kernels
