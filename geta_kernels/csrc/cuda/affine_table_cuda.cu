// CUDA kernel of geta::quantize.affine_table (eval batch_norm (+ residual add) (+ max pool) ->
// geta::quantize.table in one pass).
//
// Schema: geta_fx/ops/schema.py.  Contract and reference: geta_fx/ops/quantize_table.py
// (affine_table_reference).  One thread per output element (grid-stride), float32 contiguous
// inputs (others are converted first, the result cast back), fmaf for the affine terms and the
// shared table_quantize element function, so it computes the reference's values.  Compile-checked
// only (no GPU where it was written).

#include "../quantize_table_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace geta_kernels {
namespace {

constexpr int kAffineThreads = 256;
constexpr int64_t kAffineMaxBlocks = 4096;

struct AffineArgs {
  const float* x;
  const float* o;  // residual (nullptr: none)
  const float *a, *b, *a2, *b2;  // a2 == nullptr: the residual is added as it is
  int64_t c, in_n, out_n;        // channels, elements per input / output plane
  int64_t kh, kw, sh, sw, w, wo;  // pool (kh == 0: none)
};

__device__ inline float affine_at(const AffineArgs& p, int64_t i, int64_t ch) {
  float v = fmaf(p.x[i], p.a[ch], p.b[ch]);
  if (p.o != nullptr) v = v + (p.a2 != nullptr ? fmaf(p.o[i], p.a2[ch], p.b2[ch]) : p.o[i]);
  return v;
}

__global__ void affine_table_kernel(AffineArgs p, float* __restrict__ y, int64_t n,
                                    const float* __restrict__ d, const float* __restrict__ q,
                                    const float* __restrict__ scale,
                                    const int32_t* __restrict__ bounds,
                                    const int32_t* __restrict__ base, int32_t cells,
                                    bool is_signed) {
  const float dv = *d, qv = *q, sv = *scale;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t plane = i / p.out_n, k = i % p.out_n, ch = plane % p.c;
    float v;
    if (p.kh == 0) {
      v = affine_at(p, i, ch);
    } else {
      const int64_t oh = k / p.wo, ow = k % p.wo;
      const int64_t first = plane * p.in_n + oh * p.sh * p.w + ow * p.sw;
      v = -INFINITY;
      for (int64_t r = 0; r < p.kh; ++r) {
        for (int64_t s = 0; s < p.kw; ++s) {
          const float e = affine_at(p, first + r * p.w + s, ch);
          if (e > v || isnan(e)) v = e;
        }
      }
    }
    y[i] = table_quantize(v, qv, sv, dv, cells, bounds, base, is_signed);
  }
}

at::Tensor affine_table_cuda(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                             const at::Tensor& t, bool is_signed, const at::Tensor& scale,
                             const at::Tensor& bounds, const at::Tensor& base,
                             const at::Tensor& alpha, const at::Tensor& beta,
                             const c10::optional<at::Tensor>& other,
                             const c10::optional<at::Tensor>& alpha2,
                             const c10::optional<at::Tensor>& beta2, c10::IntArrayRef pool) {
  constexpr const char* op = "geta::quantize.affine_table";
  check_quantize_table_inputs(op, x, d, q_m, t, scale, bounds, base);
  check_affine_table_inputs(op, x, alpha, beta, other, alpha2, beta2, pool);
  TORCH_CHECK(x.device().is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ",
              x.device().str());
  const c10::cuda::CUDAGuard guard(x.device());
  const AffineOperands ops = affine_operands(x, alpha, beta, other, alpha2, beta2, pool);
  AffineArgs p{};
  if (!pool.empty()) {
    p.kh = pool[0], p.kw = pool[1], p.sh = pool[2], p.sw = pool[3];
    p.w = x.size(3), p.wo = ops.out_sizes[3];
  }
  at::Tensor y = at::empty(ops.out_sizes, ops.x.options());
  const int64_t planes = x.size(0) * x.size(1);
  const int64_t n = y.numel();
  if (n == 0) return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  p.x = ops.x.const_data_ptr<float>();
  p.o = ops.other.defined() ? ops.other.const_data_ptr<float>() : nullptr;
  p.a = ops.alpha.const_data_ptr<float>(), p.b = ops.beta.const_data_ptr<float>();
  p.a2 = ops.alpha2.defined() ? ops.alpha2.const_data_ptr<float>() : nullptr;
  p.b2 = ops.beta2.defined() ? ops.beta2.const_data_ptr<float>() : nullptr;
  p.c = x.size(1), p.in_n = x.numel() / planes, p.out_n = n / planes;
  const at::Tensor bc = bounds.contiguous(), bs = base.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t blocks =
      std::min<int64_t>(kAffineMaxBlocks, (n + kAffineThreads - 1) / kAffineThreads);
  affine_table_kernel<<<static_cast<unsigned int>(blocks), kAffineThreads, 0, stream>>>(
      p, y.mutable_data_ptr<float>(), n, d.const_data_ptr<float>(), q_m.const_data_ptr<float>(),
      scale.const_data_ptr<float>(), bc.const_data_ptr<int32_t>(), bs.const_data_ptr<int32_t>(),
      static_cast<int32_t>(bc.numel()), is_signed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CUDA, m) {
  m.impl("quantize.affine_table", &geta_kernels::affine_table_cuda);
}
