// Fused CUDA kernels for geta::quantize and geta::quantize_backward.
//
// Schema: geta_fx/ops/schema.py (defined once, in Python).  Contract: geta_fx/ops/reference.py
// (the oracle).  This file only registers CUDA implementations of those schemas.
//
// Memory-bound design: each element of x (and grad_y) is read once and each output element
// written once, with 16-byte vector accesses (4 x float32, 8 x float16/bfloat16) when every
// pointer is 16-byte aligned, kUnroll independent vectors in flight per thread, and a grid sized
// to the resident capacity of the GPU (grid-stride loop).  The backward kernel also reduces the
// three per-tensor gradients: per-thread float32 sums -> warp shuffles -> one slot per block,
// then a one-block finalize kernel sums the slots in a fixed order in double.  No atomics: the
// result is bitwise reproducible for a given GPU model and tensor size.  The scalars d, q_m, t
// are read on the device (no host synchronisation); everything runs on the current stream.
//
// Arithmetic matches the reference's ATen ops: expf/logf (no fast-math), IEEE division, rintf
// (half-to-even), and the exact branch c = m for t == 1 (bitwise identical there).  For t != 1
// a MUFU fast path is taken wherever it provably rounds like expf/logf (see power_ratio).

#include "../quantize_common.h"
#include "quantize_kernels.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

namespace geta_kernels {
namespace {

constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int sm_count(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  v = std::max(v, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Resident blocks per SM of kernel K (cached per kernel instantiation and device).
template <auto K>
int blocks_per_sm(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, K, kThreads, 0));
  v = std::max(v, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Enough blocks to cover the work once, capped at what the GPU holds at a time.
template <auto K>
int grid_for(int64_t n, int vec, int dev) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll * vec;
  const int64_t need = std::max<int64_t>(1, (n + per_block - 1) / per_block);
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * blocks_per_sm<K>(dev);
  return static_cast<int>(std::min(need, cap));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ",
              x.device().str());
}

template <typename T>
void launch_forward(const at::Tensor& x, at::Tensor& y, const at::Tensor& d,
                    const at::Tensor& q_m, const at::Tensor& t, bool is_signed) {
  const int64_t n = x.numel();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const float* pd = d.const_data_ptr<float>();
  const float* pq = q_m.const_data_ptr<float>();
  const float* pt = t.const_data_ptr<float>();
  constexpr int V = 16 / sizeof(T);
  if (aligned16(xp) && aligned16(yp)) {
    constexpr auto kernel = quantize_forward_kernel<T, V>;
    kernel<<<grid_for<kernel>(n, V, dev), kThreads, 0, stream>>>(xp, yp, n, pd, pq, pt,
                                                                  is_signed);
  } else {
    constexpr auto kernel = quantize_forward_kernel<T, 1>;
    kernel<<<grid_for<kernel>(n, 1, dev), kThreads, 0, stream>>>(xp, yp, n, pd, pq, pt,
                                                                  is_signed);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gy, x, gx share one dense layout (see in_layout_of); all undefined when n == 0, in which case
// only the finalize kernel runs and writes the (zero) sums.
template <typename T>
void launch_backward(int64_t n, int dev, const at::Tensor& gy, const at::Tensor& x,
                     at::Tensor& gx, const at::Tensor& d, const at::Tensor& q_m,
                     const at::Tensor& t, bool is_signed, at::Tensor& grad_d,
                     at::Tensor& grad_q_m, at::Tensor& grad_t) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const float* pd = d.const_data_ptr<float>();
  const float* pq = q_m.const_data_ptr<float>();
  const float* pt = t.const_data_ptr<float>();
  at::Tensor partials;
  int nparts = 0;
  if (n > 0) {
    const T* gp = gy.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* op = gx.mutable_data_ptr<T>();
    constexpr int V = 16 / sizeof(T);
    constexpr auto kv = quantize_backward_kernel<T, V>;
    constexpr auto k1 = quantize_backward_kernel<T, 1>;
    const bool vec = aligned16(gp) && aligned16(xp) && aligned16(op);
    nparts = vec ? grid_for<kv>(n, V, dev) : grid_for<k1>(n, 1, dev);
    partials = at::empty({3 * static_cast<int64_t>(nparts)}, d.options().dtype(at::kFloat));
    float* pp = partials.mutable_data_ptr<float>();
    if (vec) {
      kv<<<nparts, kThreads, 0, stream>>>(gp, xp, op, n, pd, pq, pt, is_signed, pp);
    } else {
      k1<<<nparts, kThreads, 0, stream>>>(gp, xp, op, n, pd, pq, pt, is_signed, pp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  quantize_backward_finalize_kernel<<<1, kThreads, 0, stream>>>(
      nparts > 0 ? partials.const_data_ptr<float>() : nullptr, nparts, pq, pt,
      grad_d.mutable_data_ptr<float>(), grad_q_m.mutable_data_ptr<float>(),
      grad_t.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                         const at::Tensor& t, bool is_signed) {
  constexpr const char* op = "geta::quantize";
  check_quantize_inputs(op, x, d, q_m, t);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor xd = in_layout_of(x, y);
  switch (x.scalar_type()) {
    case c10::ScalarType::Float:
      launch_forward<float>(xd, y, d, q_m, t, is_signed);
      break;
    case c10::ScalarType::Half:
      launch_forward<c10::Half>(xd, y, d, q_m, t, is_signed);
      break;
    case c10::ScalarType::BFloat16:
      launch_forward<c10::BFloat16>(xd, y, d, q_m, t, is_signed);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(x.scalar_type()));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
    const at::Tensor& t, bool is_signed) {
  constexpr const char* op = "geta::quantize_backward";
  check_quantize_backward_inputs(op, grad_y, x, d, q_m, t);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_d = at::empty(d.sizes(), d.options().dtype(at::kFloat));
  at::Tensor grad_q_m = at::empty(q_m.sizes(), q_m.options().dtype(at::kFloat));
  at::Tensor grad_t = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  const int dev = x.get_device();
  at::Tensor xd, gd;
  if (n > 0) {
    xd = in_layout_of(x, grad_x);
    gd = in_layout_of(grad_y, grad_x);
  }
  switch (x.scalar_type()) {
    case c10::ScalarType::Float:
      launch_backward<float>(n, dev, gd, xd, grad_x, d, q_m, t, is_signed, grad_d, grad_q_m,
                             grad_t);
      break;
    case c10::ScalarType::Half:
      launch_backward<c10::Half>(n, dev, gd, xd, grad_x, d, q_m, t, is_signed, grad_d,
                                 grad_q_m, grad_t);
      break;
    case c10::ScalarType::BFloat16:
      launch_backward<c10::BFloat16>(n, dev, gd, xd, grad_x, d, q_m, t, is_signed, grad_d,
                                     grad_q_m, grad_t);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(x.scalar_type()));
  }
  return {grad_x, grad_d, grad_q_m, grad_t};
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CUDA, m) {
  m.impl("quantize", &geta_kernels::quantize_cuda);
  m.impl("quantize_backward", &geta_kernels::quantize_backward_cuda);
}
