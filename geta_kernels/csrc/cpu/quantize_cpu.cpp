// Fused CPU kernels for geta::quantize and geta::quantize_backward.
//
// Schema: geta_fx/ops/schema.py (defined once, in Python).  Contract: geta_fx/ops/reference.py
// (the oracle).  This file only registers CPU implementations of those schemas.
//
// One pass over x (and grad_y): every element is loaded once, converted to float32, processed
// with at::vec::Vectorized<float> (AVX2/AVX-512 when the loader compiles for them, exp/log from
// Sleef through at::vec), and stored once.  Work is split into fixed blocks of kBlock elements
// run by at::parallel_for; each block reduces its three gradient sums into its own slot, and the
// slots are summed in block order in double, so the result does not depend on the thread count.

#include "../quantize_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace geta_kernels {
namespace {

using Vec = at::vec::Vectorized<float>;

// Elements per reduction block: fixed (not derived from the thread count) for determinism.
constexpr int64_t kBlock = 16384;
// Elements converted at a time for float16/bfloat16 (float32 staging buffers on the stack).
constexpr int64_t kChunk = 1024;
static_assert(kBlock % kChunk == 0, "kBlock must be a multiple of kChunk");

struct Consts {
  float d;
  float q;
  float t;
};

// ---------------------------------------------------------------------------------------------
// float16 / bfloat16 <-> float32 staging
// ---------------------------------------------------------------------------------------------
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using bVec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + Vec::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  using bVec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    bVec v = at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()));
    v.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // round-to-nearest-even, like .to()
}

// ---------------------------------------------------------------------------------------------
// The element math on float32 vectors (see the contract in geta_fx/ops/reference.py)
// ---------------------------------------------------------------------------------------------
struct VConsts {
  Vec d, q, t, zero, one, nan;
  explicit VConsts(const Consts& k)
      : d(k.d), q(k.q), t(k.t), zero(0.f), one(1.f),
        nan(std::numeric_limits<float>::quiet_NaN()) {}
};

template <bool SIGNED>
inline Vec active_mask(const Vec& x, const Vec& m, const VConsts& k) {
  Vec active = m > k.zero;  // NaN -> false
  if constexpr (!SIGNED) active = active & (x > k.zero);
  return active;
}

template <bool SIGNED, bool T_ONE>
inline Vec forward_vec(const Vec& x, const VConsts& k) {
  const Vec a = x.abs();
  const Vec m = at::vec::minimum(a, k.q);  // propagates NaN; +-inf -> q_m
  const Vec active = active_mask<SIGNED>(x, m, k);
  const Vec base = Vec::blendv(k.one, m, active);
  Vec c;
  if constexpr (T_ONE) {
    c = base;  // exact linear quantizer
  } else {
    c = (k.t * base.log()).exp();
  }
  const Vec r = c / k.d;  // true IEEE division
  const Vec level = r.round() * k.d;  // half-to-even
  const Vec signed_level = Vec::blendv(level, level.neg(), x < k.zero);
  Vec y = Vec::blendv(k.zero, signed_level, active);
  return Vec::blendv(y, x, x.isnan());  // NaN propagates as the input NaN
}

template <bool SIGNED, bool T_ONE>
inline void forward_span(const float* x, float* y, int64_t n, const Consts& kc) {
  const VConsts k(kc);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    forward_vec<SIGNED, T_ONE>(Vec::loadu(x + i), k).store(y + i);
  }
  if (i < n) {
    const int cnt = static_cast<int>(n - i);
    forward_vec<SIGNED, T_ONE>(Vec::loadu(x + i, cnt), k).store(y + i, cnt);
  }
}

struct VAcc {
  Vec d{0.f}, q{0.f}, t{0.f};
};

template <bool SIGNED, bool T_ONE, bool PARTIAL>
inline Vec backward_vec(const Vec& x, const Vec& g, const VConsts& k, VAcc& acc, int cnt) {
  const Vec a = x.abs();
  const Vec m = at::vec::minimum(a, k.q);
  const Vec active = active_mask<SIGNED>(x, m, k);
  const Vec is_nan = x.isnan();
  const Vec neg = x < k.zero;
  const Vec clipped = a > k.q;

  Vec blocked = clipped;
  if constexpr (!SIGNED) blocked = blocked | neg;
  Vec gx = Vec::blendv(g, k.zero, blocked);
  gx = Vec::blendv(gx, x, is_nan);

  const Vec base = Vec::blendv(k.one, m, active);
  const Vec lb = base.log();
  Vec c;
  if constexpr (T_ONE) {
    c = base;
  } else {
    c = (k.t * lb).exp();
  }
  const Vec r = c / k.d;
  const Vec gs = Vec::blendv(k.zero, Vec::blendv(g, g.neg(), neg), active);

  Vec cd = gs * (r.round() - r);
  Vec cq = Vec::blendv(k.zero, gs, active & clipped);
  Vec ct = gs * c * lb;
  cd = Vec::blendv(cd, k.nan, is_nan);
  cq = Vec::blendv(cq, k.nan, is_nan);
  ct = Vec::blendv(ct, k.nan, is_nan);
  if constexpr (PARTIAL) {  // lanes past the end were loaded as 0; keep them out of the sums
    const Vec valid = Vec::arange(0.f, 1.f) < Vec(static_cast<float>(cnt));
    cd = Vec::blendv(k.zero, cd, valid);
    cq = Vec::blendv(k.zero, cq, valid);
    ct = Vec::blendv(k.zero, ct, valid);
  }
  acc.d = acc.d + cd;
  acc.q = acc.q + cq;
  acc.t = acc.t + ct;
  return gx;
}

template <bool SIGNED, bool T_ONE>
inline void backward_span(const float* x, const float* g, float* gx, int64_t n,
                          const VConsts& k, VAcc& acc) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    backward_vec<SIGNED, T_ONE, false>(Vec::loadu(x + i), Vec::loadu(g + i), k, acc, 0)
        .store(gx + i);
  }
  if (i < n) {
    const int cnt = static_cast<int>(n - i);
    backward_vec<SIGNED, T_ONE, true>(Vec::loadu(x + i, cnt), Vec::loadu(g + i, cnt), k, acc, cnt)
        .store(gx + i, cnt);
  }
}

inline double lane_sum(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  double s = 0.0;
  for (int i = 0; i < Vec::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Blocked, parallel drivers
// ---------------------------------------------------------------------------------------------
inline int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

template <typename T, bool SIGNED, bool T_ONE>
void forward_impl(const T* x, T* y, int64_t n, const Consts& k) {
  at::parallel_for(0, num_blocks(n), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock;
      const int64_t len = std::min(kBlock, n - begin);
      if constexpr (std::is_same_v<T, float>) {
        forward_span<SIGNED, T_ONE>(x + begin, y + begin, len, k);
      } else {
        alignas(64) float xb[kChunk];
        alignas(64) float yb[kChunk];
        for (int64_t off = 0; off < len; off += kChunk) {
          const int64_t cl = std::min(kChunk, len - off);
          to_float(x + begin + off, xb, cl);
          forward_span<SIGNED, T_ONE>(xb, yb, cl, k);
          from_float(yb, y + begin + off, cl);
        }
      }
    }
  });
}

struct Sums {
  double d = 0.0, q = 0.0, t = 0.0;
};

template <typename T, bool SIGNED, bool T_ONE>
Sums backward_impl(const T* x, const T* g, T* gx, int64_t n, const Consts& kc) {
  const int64_t nb = num_blocks(n);
  std::vector<double> partial(static_cast<size_t>(nb) * 3, 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const VConsts k(kc);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock;
      const int64_t len = std::min(kBlock, n - begin);
      VAcc acc;
      if constexpr (std::is_same_v<T, float>) {
        backward_span<SIGNED, T_ONE>(x + begin, g + begin, gx + begin, len, k, acc);
      } else {
        alignas(64) float xb[kChunk];
        alignas(64) float gb[kChunk];
        alignas(64) float ob[kChunk];
        for (int64_t off = 0; off < len; off += kChunk) {
          const int64_t cl = std::min(kChunk, len - off);
          to_float(x + begin + off, xb, cl);
          to_float(g + begin + off, gb, cl);
          backward_span<SIGNED, T_ONE>(xb, gb, ob, cl, k, acc);
          from_float(ob, gx + begin + off, cl);
        }
      }
      partial[3 * b + 0] = lane_sum(acc.d);
      partial[3 * b + 1] = lane_sum(acc.q);
      partial[3 * b + 2] = lane_sum(acc.t);
    }
  });
  Sums s;
  for (int64_t b = 0; b < nb; ++b) {  // fixed order: deterministic for any thread count
    s.d += partial[3 * b + 0];
    s.q += partial[3 * b + 1];
    s.t += partial[3 * b + 2];
  }
  return s;
}

template <typename T>
void forward_dispatch(const T* x, T* y, int64_t n, const Consts& k, bool is_signed) {
  const bool t_one = k.t == 1.0f;
  if (is_signed) {
    t_one ? forward_impl<T, true, true>(x, y, n, k) : forward_impl<T, true, false>(x, y, n, k);
  } else {
    t_one ? forward_impl<T, false, true>(x, y, n, k) : forward_impl<T, false, false>(x, y, n, k);
  }
}

template <typename T>
Sums backward_dispatch(const T* x, const T* g, T* gx, int64_t n, const Consts& k,
                       bool is_signed) {
  const bool t_one = k.t == 1.0f;
  if (is_signed) {
    return t_one ? backward_impl<T, true, true>(x, g, gx, n, k)
                 : backward_impl<T, true, false>(x, g, gx, n, k);
  }
  return t_one ? backward_impl<T, false, true>(x, g, gx, n, k)
               : backward_impl<T, false, false>(x, g, gx, n, k);
}

// P(b, e) of the contract: exact for e == 1, else exp(e * log(b)).
inline float pow_pos(float b, float e) { return e == 1.0f ? b : std::exp(e * std::log(b)); }

Consts read_consts(const at::Tensor& d, const at::Tensor& q_m, const at::Tensor& t) {
  return Consts{d.const_data_ptr<float>()[0], q_m.const_data_ptr<float>()[0],
                t.const_data_ptr<float>()[0]};
}

void check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got ",
              x.device().str());
}

// ---------------------------------------------------------------------------------------------
// Op implementations
// ---------------------------------------------------------------------------------------------
at::Tensor quantize_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                        const at::Tensor& t, bool is_signed) {
  constexpr const char* op = "geta::quantize";
  check_quantize_inputs(op, x, d, q_m, t);
  check_cpu(op, x);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const at::Tensor xd = in_layout_of(x, y);
  const Consts k = read_consts(d, q_m, t);
  switch (x.scalar_type()) {
    case c10::ScalarType::Float:
      forward_dispatch<float>(xd.const_data_ptr<float>(), y.mutable_data_ptr<float>(), n, k,
                              is_signed);
      break;
    case c10::ScalarType::Half:
      forward_dispatch<c10::Half>(xd.const_data_ptr<c10::Half>(),
                                  y.mutable_data_ptr<c10::Half>(), n, k, is_signed);
      break;
    case c10::ScalarType::BFloat16:
      forward_dispatch<c10::BFloat16>(xd.const_data_ptr<c10::BFloat16>(),
                                      y.mutable_data_ptr<c10::BFloat16>(), n, k, is_signed);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(x.scalar_type()));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
    const at::Tensor& t, bool is_signed) {
  constexpr const char* op = "geta::quantize_backward";
  check_quantize_backward_inputs(op, grad_y, x, d, q_m, t);
  check_cpu(op, x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_d = at::empty(d.sizes(), d.options().dtype(at::kFloat));
  at::Tensor grad_q_m = at::empty(q_m.sizes(), q_m.options().dtype(at::kFloat));
  at::Tensor grad_t = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  const Consts k = read_consts(d, q_m, t);
  Sums s;
  if (n > 0) {
    const at::Tensor xd = in_layout_of(x, grad_x);
    const at::Tensor gd = in_layout_of(grad_y, grad_x);
    switch (x.scalar_type()) {
      case c10::ScalarType::Float:
        s = backward_dispatch<float>(xd.const_data_ptr<float>(), gd.const_data_ptr<float>(),
                                     grad_x.mutable_data_ptr<float>(), n, k, is_signed);
        break;
      case c10::ScalarType::Half:
        s = backward_dispatch<c10::Half>(xd.const_data_ptr<c10::Half>(),
                                         gd.const_data_ptr<c10::Half>(),
                                         grad_x.mutable_data_ptr<c10::Half>(), n, k, is_signed);
        break;
      case c10::ScalarType::BFloat16:
        s = backward_dispatch<c10::BFloat16>(
            xd.const_data_ptr<c10::BFloat16>(), gd.const_data_ptr<c10::BFloat16>(),
            grad_x.mutable_data_ptr<c10::BFloat16>(), n, k, is_signed);
        break;
      default:
        TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(x.scalar_type()));
    }
  }
  // grad_q_m = (sum over the saturated region of grad_y * s) * t * q_m^(t-1); 0 if q_m <= 0.
  const float dq_factor = k.q > 0.0f ? k.t * pow_pos(k.q, k.t - 1.0f) : 0.0f;
  grad_d.mutable_data_ptr<float>()[0] = static_cast<float>(s.d);
  grad_q_m.mutable_data_ptr<float>()[0] = static_cast<float>(s.q) * dq_factor;
  grad_t.mutable_data_ptr<float>()[0] = static_cast<float>(s.t);
  return {grad_x, grad_d, grad_q_m, grad_t};
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CPU, m) {
  m.impl("quantize", &geta_kernels::quantize_cpu);
  m.impl("quantize_backward", &geta_kernels::quantize_backward_cpu);
}
