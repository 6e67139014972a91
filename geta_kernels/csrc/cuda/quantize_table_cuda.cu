// CUDA kernel of geta::quantize.table (an activation quantizer's levels from a threshold table).
//
// Schema: geta_fx/ops/schema.py.  Contract and reference: geta_fx/ops/quantize_table.py; the
// element function (table_quantize) is shared with the CPU kernel (quantize_table_common.h), so
// both agree with the reference bit for bit.  A grid-stride loop, one element per thread per
// iteration, computed in float32; d, q_m and scale are read on the device (no host sync); the
// current stream.

#include "../quantize_table_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace geta_kernels {
namespace {

constexpr int kTableThreads = 256;
constexpr int64_t kTableMaxBlocks = 4096;

template <typename T>
__global__ void quantize_table_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                                      const float* __restrict__ d, const float* __restrict__ q,
                                      const float* __restrict__ scale,
                                      const int32_t* __restrict__ bounds,
                                      const int32_t* __restrict__ base, int32_t cells,
                                      bool is_signed) {
  const float dv = *d, qv = *q, sv = *scale;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float v = static_cast<float>(x[i]);
    y[i] = static_cast<T>(table_quantize(v, qv, sv, dv, cells, bounds, base, is_signed));
  }
}

template <typename T>
void launch_table(const at::Tensor& x, at::Tensor& y, const at::Tensor& d, const at::Tensor& q_m,
                  const at::Tensor& scale, const at::Tensor& bounds, const at::Tensor& base,
                  bool is_signed) {
  const int64_t n = x.numel();
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int64_t blocks =
      std::min<int64_t>(kTableMaxBlocks, (n + kTableThreads - 1) / kTableThreads);
  quantize_table_kernel<T><<<static_cast<unsigned int>(blocks), kTableThreads, 0, stream>>>(
      x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), n, d.const_data_ptr<float>(),
      q_m.const_data_ptr<float>(), scale.const_data_ptr<float>(), bounds.const_data_ptr<int32_t>(),
      base.const_data_ptr<int32_t>(), static_cast<int32_t>(bounds.numel()), is_signed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantize_table_cuda(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                               const at::Tensor& t, bool is_signed, const at::Tensor& scale,
                               const at::Tensor& bounds, const at::Tensor& base) {
  constexpr const char* op = "geta::quantize.table";
  check_quantize_table_inputs(op, x, d, q_m, t, scale, bounds, base);
  TORCH_CHECK(x.device().is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ",
              x.device().str());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor xd = in_layout_of(x, y);
  const at::Tensor bc = bounds.contiguous(), bs = base.contiguous();
  switch (x.scalar_type()) {
    case c10::ScalarType::Float:
      launch_table<float>(xd, y, d, q_m, scale, bc, bs, is_signed);
      break;
    case c10::ScalarType::Half:
      launch_table<c10::Half>(xd, y, d, q_m, scale, bc, bs, is_signed);
      break;
    case c10::ScalarType::BFloat16:
      launch_table<c10::BFloat16>(xd, y, d, q_m, scale, bc, bs, is_signed);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(x.scalar_type()));
  }
  return y;
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CUDA, m) {
  m.impl("quantize.table", &geta_kernels::quantize_table_cuda);
}
