// Device code of the fused quantizer kernels (geta::quantize, geta::quantize_backward), shared
// by the torch extension (quantize_cuda.cu, T = float / c10::Half / c10::BFloat16) and the
// standalone tuning lab (benchmarks/cuda_lab/quant_lab.cu, T = float / __half /
// __nv_bfloat16).  No torch headers: element types convert with static_cast to/from float.
//
// Tuning knobs (template parameters; the extension uses the defaults, the lab sweeps them):
//   UNROLL  independent 16-byte vectors in flight per thread per iteration (default kUnroll);
//   MATH    0: the measured arithmetic (fast nonlinear path accepted by a floor-based tie test,
//              exact linear path); 1: the tie test uses the FADD rounding (rint_fast) instead
//              of FRND floor + rintf; 2: MATH 1 plus a reciprocal fast path for t == 1;
//   PACK    convert fp16/bf16 outputs in pairs (F2FP) - only for T = __half / __nv_bfloat16.
// Every MATH variant rounds exactly like the exact path (see power_ratio), so forward outputs
// are bitwise identical across variants; the lab checks that.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace geta_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // independent vector loads in flight per thread per iteration

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
// rintf (round half to even) for |r| < 2^23 with two FADDs instead of the quarter-rate FRND:
// r + 2^23 lands where the float spacing is 1, so the FADD rounds r to an integer (ties to even)
// and subtracting 2^23 back is exact.  |r| >= 2^23 is already an integer; NaN stays NaN;
// copysignf keeps rintf's sign of zero.  (MATH >= 1 only.)
__device__ __forceinline__ float rint_fast(float r) {
  const float big = copysignf(0x1p23f, r);
  const float k = copysignf(__fsub_rn(__fadd_rn(r, big), big), r);
  return fabsf(r) < 0x1p23f ? k : r;
}

// c, lb, r as described above and k = rintf(r) (the exact path's rounding).
template <int MATH>
__device__ __forceinline__ void power_ratio(float base, const Params& p, float& c, float& lb,
                                            float& r, float& k) {
  const float l2 = __log2f(base);
  const float z = p.t * l2;
  const float cf = exp2f(z);
  const float rf = cf * p.inv_d;
  const float tol = fabsf(rf) * (0x1p-20f * (3.f + fabsf(p.t) + 1.5f * fabsf(z)));
  bool fast;
  float kf = 0.f;
  if constexpr (MATH == 0) {
    const float frac = rf - floorf(rf);
    fast = base >= 0x1p-100f && fabsf(rf) < 0x1p22f && fabsf(frac - 0.5f) > tol;
  } else {  // the distance to the nearest tie from the FADD-rounded integer: no FRND
    kf = rint_fast(rf);
    fast = base >= 0x1p-100f && fabsf(rf) < 0x1p22f && 0.5f - fabsf(rf - kf) > tol;
  }
  if (fast) {
    c = cf;
    lb = l2 * 0.69314718f;  // ln 2
    r = rf;
    k = MATH == 0 ? rintf(r) : kf;
  } else {
    lb = logf(base);
    c = expf(p.t * lb);
    r = c / p.d;
    k = rintf(r);
  }
}

// t == 1: r = base / d and k = rintf(r).  MATH 2: r' = base * (1/d) (<= 2 roundings vs 1, so
// |r' - r| <= |r| 2^-22) kept where it is farther than 2x that from a tie, else the division.
template <int MATH>
__device__ __forceinline__ void linear_ratio(float base, const Params& p, float& r, float& k) {
  if constexpr (MATH == 2) {
    const float rf = base * p.inv_d;
    const float kf = rint_fast(rf);
    const bool normal_inv = fabsf(p.inv_d) >= 0x1p-126f && fabsf(p.inv_d) <= 0x1p126f;
    if (normal_inv && fabsf(rf) < 0x1p22f && 0.5f - fabsf(rf - kf) > fabsf(rf) * 0x1p-21f) {
      r = rf;
      k = kf;
      return;
    }
  }
  r = base / p.d;  // IEEE division (no fast-math)
  k = rintf(r);    // half-to-even
}

template <bool T_ONE, int MATH = 0>
__device__ __forceinline__ float forward_elem(float x, const Params& p, bool is_signed) {
  const float a = fabsf(x);
  const float m = a > p.q ? p.q : a;  // min(|x|, q_m); NaN stays NaN, +-inf -> q_m
  const bool active = m > 0.f && (is_signed || x > 0.f);
  const float base = active ? m : 1.f;
  float c, lb, r, k;
  if (T_ONE) {
    linear_ratio<MATH>(base, p, r, k);
  } else {
    power_ratio<MATH>(base, p, c, lb, r, k);
  }
  const float level = k * p.d;
  const float y = active ? (x < 0.f ? -level : level) : 0.f;
  return isnan(x) ? x : y;
}

struct Acc {
  float d = 0.f, q = 0.f, t = 0.f;
};

template <bool T_ONE, int MATH = 0>
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
  float c, lb, r, k;
  if (T_ONE) {
    lb = __logf(base);
    c = base;
    linear_ratio<MATH>(base, p, r, k);
  } else {
    power_ratio<MATH>(base, p, c, lb, r, k);
  }
  const float gs = active ? (neg ? -g : g) : 0.f;
  float cd = gs * (k - r);
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
// VEC float results -> one output vector; PACK converts fp16/bf16 in pairs (F2FP).
template <typename T, int VEC, bool PACK>
__device__ __forceinline__ void store_pack(const float (&f)[VEC], Pack<T, VEC>& out) {
  if constexpr (PACK && std::is_same_v<T, __half> && VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      memcpy(&out.v[2 * i], &h, sizeof(h));
    }
  } else if constexpr (PACK && std::is_same_v<T, __nv_bfloat16> && VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      memcpy(&out.v[2 * i], &h, sizeof(h));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = static_cast<T>(f[i]);
  }
}

template <typename T, int VEC, bool T_ONE, int UNROLL = kUnroll, int MATH = 0, bool PACK = false>
__device__ __forceinline__ void forward_body(const T* __restrict__ x, T* __restrict__ y,
                                             int64_t n, const Params& p, bool is_signed) {
  using P = Pack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ yv = reinterpret_cast<P*>(y);
  for (int64_t i = tid; i < nvec; i += nthreads * UNROLL) {
    P in[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) in[u] = xv[j];
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        float f[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          f[k] = forward_elem<T_ONE, MATH>(static_cast<float>(in[u].v[k]), p, is_signed);
        }
        P out;
        store_pack<T, VEC, PACK>(f, out);
        yv[j] = out;
      }
    }
  }
  const int64_t j = nvec * VEC + tid;  // the n % VEC leftover elements, one per thread
  if (j < n) {
    y[j] = static_cast<T>(forward_elem<T_ONE, MATH>(static_cast<float>(x[j]), p, is_signed));
  }
}

template <typename T, int VEC, int UNROLL = kUnroll, int MATH = 0, bool PACK = false>
__global__ void __launch_bounds__(kThreads)
    quantize_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                            const float* __restrict__ pd, const float* __restrict__ pq,
                            const float* __restrict__ pt, bool is_signed) {
  const Params p = load_params(pd, pq, pt);
  if (p.t == 1.f) {  // uniform branch: the exact linear quantizer, no exp/log
    forward_body<T, VEC, true, UNROLL, MATH, PACK>(x, y, n, p, is_signed);
  } else {
    forward_body<T, VEC, false, UNROLL, MATH, PACK>(x, y, n, p, is_signed);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, bool T_ONE, int UNROLL = kUnroll, int MATH = 0>
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
  for (int64_t i = tid; i < nvec; i += nthreads * UNROLL) {
    P xin[UNROLL], gin[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        xin[u] = xv[j];
        gin[u] = gv[j];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t j = i + u * nthreads;
      if (j < nvec) {
        P out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = static_cast<T>(backward_elem<T_ONE, MATH>(static_cast<float>(xin[u].v[k]),
                                                         static_cast<float>(gin[u].v[k]), p,
                                                         is_signed, acc));
        }
        ov[j] = out;
      }
    }
  }
  const int64_t j = nvec * VEC + tid;
  if (j < n) {
    gx[j] = static_cast<T>(backward_elem<T_ONE, MATH>(static_cast<float>(x[j]),
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

template <typename T, int VEC, int UNROLL = kUnroll, int MATH = 0>
__global__ void __launch_bounds__(kThreads)
    quantize_backward_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                             T* __restrict__ gx, int64_t n, const float* __restrict__ pd,
                             const float* __restrict__ pq, const float* __restrict__ pt,
                             bool is_signed, float* __restrict__ partials) {
  const Params p = load_params(pd, pq, pt);
  Acc acc;
  if (p.t == 1.f) {
    backward_body<T, VEC, true, UNROLL, MATH>(gy, x, gx, n, p, is_signed, acc);
  } else {
    backward_body<T, VEC, false, UNROLL, MATH>(gy, x, gx, n, p, is_signed, acc);
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

}  // namespace
}  // namespace geta_kernels
