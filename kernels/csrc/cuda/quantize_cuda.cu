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

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // independent vector loads in flight per thread per iteration
constexpr int kMaxDevices = 64;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct Params {
  float d, q, t, inv_d;  // inv_d = 1/d (IEEE), for the fast nonlinear path only
};

__device__ __forceinline__ Params load_params(const float* __restrict__ pd,
                                              const float* __restrict__ pq,
                                              const float* __restrict__ pt) {
  const float d = __ldg(pd);
  return Params{d, __ldg(pq), __ldg(pt), 1.f / d};
}

// ---------------------------------------------------------------------------------------------
// Element math (float32), see geta_fx/ops/reference.py
// ---------------------------------------------------------------------------------------------
// Nonlinear quantizer (t != 1): c = m^t, lb = log(m), r = c / d, such that rint(r) equals the
// reference's rint(expf(t * logf(m)) / d) (the forward's level, the backward's d-gradient).
//
// The exact path (logf, expf, IEEE division: ~90 instructions) made fp16/bf16 t != 1 compute
// bound at ~45% of copy bandwidth.  The fast path uses the MUFU units instead:
// c' = exp2f(t * __log2f(m)), r' = c' * (1/d).  Error bounds (CUDA C Programming Guide,
// "Intrinsic Functions" / "Standard Functions"): __log2f has absolute error <= 2^-22 on [0.5, 2]
// and <= 2 ulp elsewhere, exp2f <= 2 ulp, logf <= 1 ulp, expf <= 2 ulp; propagating them through
// both pipelines (z = t log2 m) gives |r' - r| <= |r| * 2^-22 * (3 + |t| + 1.5 |z|).  We keep
// r' when it lies farther than 4x that bound from a rounding tie (a half-integer), so both round
// to the same integer; otherwise (about 1e-4 of elements for 7-bit levels, also for tiny m,
// huge r and non-finite values) the exact path runs.  Forward outputs are therefore identical to
// the exact path; c' and lb' only feed the backward's per-tensor sums, at relative error
// ~1e-6 per element, far inside those sums' float32 rounding tolerance.
__device__ __forceinline__ void power_ratio(float base, const Params& p, float& c, float& lb,
                                            float& r) {
  const float l2 = __log2f(base);
  const float z = p.t * l2;
  const float cf = exp2f(z);
  const float rf = cf * p.inv_d;
  const float tol = fabsf(rf) * (0x1p-20f * (3.f + fabsf(p.t) + 1.5f * fabsf(z)));
  const float frac = rf - floorf(rf);
  if (base >= 0x1p-100f && fabsf(rf) < 0x1p22f && fabsf(frac - 0.5f) > tol) {
    c = cf;
    lb = l2 * 0.69314718f;  // ln 2
    r = rf;
  } else {
    lb = logf(base);
    c = expf(p.t * lb);
    r = c / p.d;
  }
}

template <bool T_ONE>
__device__ __forceinline__ float forward_elem(float x, const Params& p, bool is_signed) {
  const float a = fabsf(x);
  const float m = a > p.q ? p.q : a;  // min(|x|, q_m); NaN stays NaN, +-inf -> q_m
  const bool active = m > 0.f && (is_signed || x > 0.f);
  const float base = active ? m : 1.f;
  float c, lb, r;
  if (T_ONE) {
    c = base;
    r = c / p.d;  // IEEE division (no fast-math)
  } else {
    power_ratio(base, p, c, lb, r);
  }
  const float level = rintf(r) * p.d;     // half-to-even
  const float y = active ? (x < 0.f ? -level : level) : 0.f;
  return isnan(x) ? x : y;
}

struct Acc {
  float d = 0.f, q = 0.f, t = 0.f;
};

template <bool T_ONE>
__device__ __forceinline__ float backward_elem(float x, float g, const Params& p, bool is_signed,
                                               Acc& acc) {
  const float a = fabsf(x);
  const bool clipped = a > p.q;
  const float m = clipped ? p.q : a;
  const bool neg = x < 0.f;
  const bool active = m > 0.f && (is_signed || x > 0.f);
  const bool nan = isnan(x);
  const bool blocked = clipped || (!is_signed && neg);
  float gx = blocked ? 0.f : g;
  gx = nan ? x : gx;

  const float base = active ? m : 1.f;
  // t == 1: log(m) only feeds the grad_t sum, where the few-ulp __logf (MUFU lg2, subnormals
  // handled without -ftz) is far inside the summation-rounding tolerance of the contract.
  // t != 1: power_ratio, which rounds like the forward (and the reference's expf/logf).
  float c, lb, r;
  if (T_ONE) {
    lb = __logf(base);
    c = base;
    r = c / p.d;
  } else {
    power_ratio(base, p, c, lb, r);
  }
  const float gs = active ? (neg ? -g : g) : 0.f;
  float cd = gs * (rintf(r) - r);
  float cq = (active && clipped) ? gs : 0.f;
  float ct = gs * c * lb;
  if (nan) {
    cd = cq = ct = __int_as_float(0x7fc00000);
  }
  acc.d += cd;
  acc.q += cq;
  acc.t += ct;
  return gx;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, bool T_ONE>
__device__ __forceinline__ void forward_body(const T* __restrict__ x, T* __restrict__ y,
                                             int64_t n, const Params& p, bool is_signed) {
  using P = Pack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ yv = reinterpret_cast<P*>(y);
  for (int64_t i = tid; i < nvec; i += nthreads * kUnroll) {
    P in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) in[u] = xv[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        P out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = static_cast<T>(
              forward_elem<T_ONE>(static_cast<float>(in[u].v[k]), p, is_signed));
        }
        yv[j] = out;
      }
    }
  }
  const int64_t j = nvec * VEC + tid;  // the n % VEC leftover elements, one per thread
  if (j < n) y[j] = static_cast<T>(forward_elem<T_ONE>(static_cast<float>(x[j]), p, is_signed));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    quantize_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                            const float* __restrict__ pd, const float* __restrict__ pq,
                            const float* __restrict__ pt, bool is_signed) {
  const Params p = load_params(pd, pq, pt);
  if (p.t == 1.f) {  // uniform branch: the exact linear quantizer, no exp/log
    forward_body<T, VEC, true>(x, y, n, p, is_signed);
  } else {
    forward_body<T, VEC, false>(x, y, n, p, is_signed);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, bool T_ONE>
__device__ __forceinline__ void backward_body(const T* __restrict__ gy, const T* __restrict__ x,
                                              T* __restrict__ gx, int64_t n, const Params& p,
                                              bool is_signed, Acc& acc) {
  using P = Pack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const P* __restrict__ gv = reinterpret_cast<const P*>(gy);
  P* __restrict__ ov = reinterpret_cast<P*>(gx);
  for (int64_t i = tid; i < nvec; i += nthreads * kUnroll) {
    P xin[kUnroll], gin[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        xin[u] = xv[j];
        gin[u] = gv[j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        P out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = static_cast<T>(backward_elem<T_ONE>(static_cast<float>(xin[u].v[k]),
                                                         static_cast<float>(gin[u].v[k]), p,
                                                         is_signed, acc));
        }
        ov[j] = out;
      }
    }
  }
  const int64_t j = nvec * VEC + tid;
  if (j < n) {
    gx[j] = static_cast<T>(backward_elem<T_ONE>(static_cast<float>(x[j]),
                                                static_cast<float>(gy[j]), p, is_signed, acc));
  }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Deterministic block sum of three values; the result is valid in thread 0.
template <typename V>
__device__ __forceinline__ void block_sum3(V& a, V& b, V& c) {
  __shared__ V smem[3][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    smem[0][warp] = a;
    smem[1][warp] = b;
    smem[2][warp] = c;
  }
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    a = lane < nwarps ? smem[0][lane] : V(0);
    b = lane < nwarps ? smem[1][lane] : V(0);
    c = lane < nwarps ? smem[2][lane] : V(0);
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    quantize_backward_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                             T* __restrict__ gx, int64_t n, const float* __restrict__ pd,
                             const float* __restrict__ pq, const float* __restrict__ pt,
                             bool is_signed, float* __restrict__ partials) {
  const Params p = load_params(pd, pq, pt);
  Acc acc;
  if (p.t == 1.f) {
    backward_body<T, VEC, true>(gy, x, gx, n, p, is_signed, acc);
  } else {
    backward_body<T, VEC, false>(gy, x, gx, n, p, is_signed, acc);
  }
  block_sum3(acc.d, acc.q, acc.t);
  if (threadIdx.x == 0) {
    partials[3 * blockIdx.x + 0] = acc.d;
    partials[3 * blockIdx.x + 1] = acc.q;
    partials[3 * blockIdx.x + 2] = acc.t;
  }
}

// One block: sums the per-block slots in a fixed order (double) and writes the three outputs.
__global__ void __launch_bounds__(kThreads)
    quantize_backward_finalize_kernel(const float* __restrict__ partials, int nparts,
                                      const float* __restrict__ pq, const float* __restrict__ pt,
                                      float* __restrict__ grad_d, float* __restrict__ grad_q_m,
                                      float* __restrict__ grad_t) {
  double sd = 0.0, sq = 0.0, st = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    sd += static_cast<double>(partials[3 * i + 0]);
    sq += static_cast<double>(partials[3 * i + 1]);
    st += static_cast<double>(partials[3 * i + 2]);
  }
  block_sum3(sd, sq, st);
  if (threadIdx.x == 0) {
    const float q = __ldg(pq);
    const float t = __ldg(pt);
    const float e = t - 1.f;
    // t * P(q_m, t - 1), P exact for exponent 1; 0 where q_m <= 0 (as the reference).
    const float dq = q > 0.f ? t * (e == 1.f ? q : expf(e * logf(q))) : 0.f;
    *grad_d = static_cast<float>(sd);
    *grad_q_m = static_cast<float>(sq) * dq;
    *grad_t = static_cast<float>(st);
  }
}

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
