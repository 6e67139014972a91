// Shared pieces of the geta::quantize.table and .affine_table kernels (CPU:
// cpu/quantize_table_cpu.cpp, cpu/affine_table_cpu.cpp; CUDA: cuda/quantize_table_cuda.cu,
// cuda/affine_table_cuda.cu).  Contract and reference: geta_fx/ops/quantize_table.py; the
// schema is defined in geta_fx/ops/schema.py.  Nothing here registers anything.
#pragma once

#include "quantize_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// Same conditions as geta_fx.ops.quantize_table.check_affine_table_inputs.
inline void check_affine_table_inputs(const char* op, const at::Tensor& x, const at::Tensor& alpha,
                               const at::Tensor& beta, const c10::optional<at::Tensor>& other,
                               const c10::optional<at::Tensor>& alpha2,
                               const c10::optional<at::Tensor>& beta2, c10::IntArrayRef pool) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have a channel dimension (N, C, ...), got ",
              shape_str(x.sizes()));
  const int64_t c = x.size(1);
  const char* names[2] = {"alpha", "beta"};
  const at::Tensor* ab[2] = {&alpha, &beta};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(ab[i]->dim() == 1 && ab[i]->numel() == c && ab[i]->is_floating_point(), op,
                ": ", names[i], " must be a 1-D float tensor of ", c, " channels, got ",
                c10::toString(ab[i]->scalar_type()), " ", shape_str(ab[i]->sizes()));
    TORCH_CHECK(ab[i]->device() == x.device(), op, ": ", names[i], " is on ",
                ab[i]->device().str(), " but x is on ", x.device().str());
  }
  TORCH_CHECK(alpha2.has_value() == beta2.has_value(), op,
              ": alpha2 and beta2 must be given together");
  TORCH_CHECK(!alpha2.has_value() || other.has_value(), op, ": alpha2/beta2 need other");
  if (other.has_value()) {
    TORCH_CHECK(other->sizes() == x.sizes() && other->scalar_type() == x.scalar_type() &&
                    other->device() == x.device(),
                op, ": other must have x's shape, dtype and device, got ",
                c10::toString(other->scalar_type()), " ", shape_str(other->sizes()), " vs ",
                c10::toString(x.scalar_type()), " ", shape_str(x.sizes()));
  }
  if (alpha2.has_value()) {
    const at::Tensor* ab2[2] = {&*alpha2, &*beta2};
    for (int i = 0; i < 2; ++i) {
      TORCH_CHECK(ab2[i]->dim() == 1 && ab2[i]->numel() == c && ab2[i]->is_floating_point() &&
                      ab2[i]->device() == x.device(),
                  op, ": ", i == 0 ? "alpha2" : "beta2", " must be a 1-D float tensor of ", c,
                  " channels on x's device, got ", shape_str(ab2[i]->sizes()));
    }
  }
  TORCH_CHECK(pool.empty() || pool.size() == 4, op,
              ": pool must be [] or [kh, kw, sh, sw], got ", shape_str(pool));
  if (!pool.empty()) {
    TORCH_CHECK(x.dim() == 4, op, ": pool needs x of shape (N, C, H, W), got ",
                shape_str(x.sizes()));
    TORCH_CHECK(pool[0] > 0 && pool[1] > 0 && pool[2] > 0 && pool[3] > 0 &&
                    pool[0] <= x.size(2) && pool[1] <= x.size(3),
                op, ": pool ", shape_str(pool), " does not fit x ", shape_str(x.sizes()));
  }
}

// geta::quantize.affine_table's operands as float32 contiguous tensors (undefined where not
// given) and its output sizes (pooled: (h - kh) / sh + 1 rows, likewise columns).
struct AffineOperands {
  at::Tensor x, other, alpha, beta, alpha2, beta2;
  std::vector<int64_t> out_sizes;
};

inline AffineOperands affine_operands(const at::Tensor& x, const at::Tensor& alpha,
                                      const at::Tensor& beta,
                                      const c10::optional<at::Tensor>& other,
                                      const c10::optional<at::Tensor>& alpha2,
                                      const c10::optional<at::Tensor>& beta2,
                                      c10::IntArrayRef pool) {
  auto f32 = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  AffineOperands o{x.to(at::kFloat).contiguous(), f32(other), f32(alpha), f32(beta),
                   f32(alpha2), f32(beta2), std::vector<int64_t>(x.sizes().begin(),
                                                                 x.sizes().end())};
  if (!pool.empty()) {
    o.out_sizes[2] = (x.size(2) - pool[0]) / pool[2] + 1;
    o.out_sizes[3] = (x.size(3) - pool[1]) / pool[3] + 1;
  }
  return o;
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
