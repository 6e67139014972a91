// CPU kernel of geta::quantize.affine_table: an eval batch_norm (per-channel fma), an optional
// residual add (of a raw tensor or of a second batch_norm), an optional max pool, and then
// geta::quantize.table, in one pass over the activation instead of three or four.
//
// Schema: geta_fx/ops/schema.py.  Contract and reference: geta_fx/ops/quantize_table.py
// (affine_table_reference; this kernel agrees with it bit for bit, NaN payloads aside).  Per
// (n, c) plane of the float32 contiguous input, blocks of up to kChunk values of
//   v = fma(x, alpha[c], beta[c]) [+ other | + fma(other, alpha2[c], beta2[c])]
// (pooled: the window maximum of v, NaN propagating, as aten.max_pool2d) go through an
// L1-resident buffer into table_span (quantize_table_span.h).  Inputs of other dtypes or
// layouts are converted to float32 contiguous first and the result cast back.

#include "../quantize_table_span.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace geta_kernels {
namespace {

constexpr int64_t kChunk = 1024;  // values per buffer flush (4 KB)

struct Affine {
  const float* x;
  const float* o;  // residual operand (nullptr: none)
  float a, b;
  float a2, b2;
  bool affine2;  // o goes through fma(o, a2, b2) first
};

// v[i] = fma(x[i], a, b) (+ residual) for i < n (x, o already offset to the block).
inline void affine_span(const Affine& f, int64_t off, int64_t n, float* v) {
  const float* x = f.x + off;
  const float* o = f.o ? f.o + off : nullptr;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 va = _mm512_set1_ps(f.a), vb = _mm512_set1_ps(f.b);
  const __m512 va2 = _mm512_set1_ps(f.a2), vb2 = _mm512_set1_ps(f.b2);
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    __m512 r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, x + i), va, vb);
    if (o) {
      __m512 w = _mm512_maskz_loadu_ps(live, o + i);
      if (f.affine2) w = _mm512_fmadd_ps(w, va2, vb2);
      r = _mm512_add_ps(r, w);
    }
    _mm512_mask_storeu_ps(v + i, live, r);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 va = _mm256_set1_ps(f.a), vb = _mm256_set1_ps(f.b);
  const __m256 va2 = _mm256_set1_ps(f.a2), vb2 = _mm256_set1_ps(f.b2);
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), va, vb);
    if (o) {
      __m256 w = _mm256_loadu_ps(o + i);
      if (f.affine2) w = _mm256_fmadd_ps(w, va2, vb2);
      r = _mm256_add_ps(r, w);
    }
    _mm256_storeu_ps(v + i, r);
  }
#endif
  for (; i < n; ++i) {
    float r = std::fma(x[i], f.a, f.b);
    if (o) r = r + (f.affine2 ? std::fma(o[i], f.a2, f.b2) : o[i]);
    v[i] = r;
  }
}

struct Pool {
  int64_t kh, kw, sh, sw, h, w, ho, wo;
};

inline uint32_t float_bits_u(float f) {
  uint32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}
inline float bits_float(uint32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// `e` replaces `m` where it is greater or NaN (aten.max_pool2d's rule), as a select: the
// data-dependent branch of a scalar loop mispredicts on about half the windows (measured: ATen's
// own NCHW max_pool2d runs 2.7x slower on random than on sorted data).
inline float max_nan(float m, float e) {
  const uint32_t take = 0u - static_cast<uint32_t>((e > m) | (e != e));  // all ones: take e
  return bits_float((float_bits_u(e) & take) | (float_bits_u(m) & ~take));
}
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 max_nan(__m512 m, __m512 e) {
  const __mmask16 take =
      _mm512_cmp_ps_mask(e, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(e, e, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(m, take, e);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 max_nan(__m256 m, __m256 e) {
  const __m256 take =
      _mm256_or_ps(_mm256_cmp_ps(e, m, _CMP_GT_OQ), _mm256_cmp_ps(e, e, _CMP_UNORD_Q));
  return _mm256_blendv_ps(m, e, take);
}
#endif

// Output row `oh` of a pooled plane: the column maxima over the window's kh rows of `v`
// (h x w affine values) into col[w], then the kw-wide windows along the row into out[wo].
inline void pool_row(const float* v, const Pool& p, int64_t oh, float* col, float* out) {
  const float* r0 = v + oh * p.sh * p.w;
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; c < p.w; c += 16) {  // masked tail: rows of small planes (8 or 4 wide) vectorise too
    const __mmask16 live =
        p.w - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.w - c)) - 1u);
    __m512 m = _mm512_maskz_loadu_ps(live, r0 + c);
    for (int64_t i = 1; i < p.kh; ++i) {
      m = max_nan(m, _mm512_maskz_loadu_ps(live, r0 + i * p.w + c));
    }
    _mm512_mask_storeu_ps(col + c, live, m);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (; c + 8 <= p.w; c += 8) {
    __m256 m = _mm256_loadu_ps(r0 + c);
    for (int64_t i = 1; i < p.kh; ++i) m = max_nan(m, _mm256_loadu_ps(r0 + i * p.w + c));
    _mm256_storeu_ps(col + c, m);
  }
#endif
  for (; c < p.w; ++c) {
    float m = r0[c];
    for (int64_t i = 1; i < p.kh; ++i) m = max_nan(m, r0[i * p.w + c]);
    col[c] = m;
  }
  int64_t o = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (p.kw == 2 && p.sw == 2) {  // pairs: even and odd columns of 32 at a time
    const __m512i even =
        _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (; o < p.wo; o += 16) {  // masked: only columns < w are read
      const int64_t left = p.w - 2 * o;
      const __mmask16 la = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
      const __mmask16 lb = left >= 32 ? __mmask16(0xFFFF)
                           : left > 16 ? __mmask16((1u << (left - 16)) - 1u) : __mmask16(0);
      const __mmask16 lo =
          p.wo - o >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.wo - o)) - 1u);
      const __m512 a = _mm512_maskz_loadu_ps(la, col + 2 * o);
      const __m512 b = _mm512_maskz_loadu_ps(lb, col + 2 * o + 16);
      _mm512_mask_storeu_ps(out + o, lo, max_nan(_mm512_permutex2var_ps(a, even, b),
                                                 _mm512_permutex2var_ps(a, odd, b)));
    }
  }
#endif
  for (; o < p.wo; ++o) {
    const float* win = col + o * p.sw;
    float m = win[0];
    for (int64_t j = 1; j < p.kw; ++j) m = max_nan(m, win[j]);
    out[o] = m;
  }
}

template <bool SIGNED>
void plane(const Affine& f, int64_t in_off, int64_t in_n, const Pool* pool, float* y,
           const Table& k, std::vector<float>& buf) {
  float* tmp = buf.data();
  if (pool == nullptr) {
    for (int64_t s = 0; s < in_n; s += kChunk) {
      const int64_t len = std::min(kChunk, in_n - s);
      affine_span(f, in_off + s, len, tmp);
      table_span<SIGNED>(tmp, y + s, len, k);
    }
    return;
  }
  // pooled: the plane's affine values (v), a column buffer, then rows of outputs into tmp
  const int64_t room = std::max(kChunk, pool->wo);
  float* v = tmp + room;
  float* col = v + in_n;
  affine_span(f, in_off, in_n, v);
  int64_t done = 0, held = 0;
  for (int64_t oh = 0; oh < pool->ho; ++oh) {
    if (held + pool->wo > room) {
      table_span<SIGNED>(tmp, y + done, held, k);
      done += held;
      held = 0;
    }
    pool_row(v, *pool, oh, col, tmp + held);
    held += pool->wo;
  }
  table_span<SIGNED>(tmp, y + done, held, k);
}

at::Tensor affine_table_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                            const at::Tensor& t, bool is_signed, const at::Tensor& scale,
                            const at::Tensor& bounds, const at::Tensor& base,
                            const at::Tensor& alpha, const at::Tensor& beta,
                            const c10::optional<at::Tensor>& other,
                            const c10::optional<at::Tensor>& alpha2,
                            const c10::optional<at::Tensor>& beta2, c10::IntArrayRef pool) {
  constexpr const char* op = "geta::quantize.affine_table";
  check_quantize_table_inputs(op, x, d, q_m, t, scale, bounds, base);
  check_affine_table_inputs(op, x, alpha, beta, other, alpha2, beta2, pool);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got ",
              x.device().str());
  const AffineOperands ops = affine_operands(x, alpha, beta, other, alpha2, beta2, pool);
  const int64_t planes = x.size(0) * x.size(1), c = x.size(1);
  const int64_t in_n = planes ? x.numel() / planes : 0;
  const bool pooled = !pool.empty();
  Pool p{};
  if (pooled) {
    p = Pool{pool[0], pool[1], pool[2], pool[3], x.size(2), x.size(3), ops.out_sizes[2],
             ops.out_sizes[3]};
  }
  at::Tensor y = at::empty(ops.out_sizes, ops.x.options());
  const int64_t out_n = planes ? y.numel() / planes : 0;
  if (y.numel() == 0) return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  const TableArgs tab = table_args(d, q_m, scale, bounds, base);
  const Table& k = tab.k;
  const float* xp = ops.x.const_data_ptr<float>();
  const float* op_ = ops.other.defined() ? ops.other.const_data_ptr<float>() : nullptr;
  const float* ap = ops.alpha.const_data_ptr<float>();
  const float* bp = ops.beta.const_data_ptr<float>();
  const float* ap2 = ops.alpha2.defined() ? ops.alpha2.const_data_ptr<float>() : nullptr;
  const float* bp2 = ops.beta2.defined() ? ops.beta2.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kTableBlock / std::max<int64_t>(1, in_n));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(pooled ? std::max(kChunk, p.wo) + in_n + p.w : kChunk);
    for (int64_t pl = p0; pl < p1; ++pl) {
      const int64_t ch = pl % c;
      const Affine f{xp, op_, ap[ch], bp[ch], ap2 ? ap2[ch] : 0.f, bp2 ? bp2[ch] : 0.f,
                     ap2 != nullptr};
      if (is_signed) {
        plane<true>(f, pl * in_n, in_n, pooled ? &p : nullptr, yp + pl * out_n, k, buf);
      } else {
        plane<false>(f, pl * in_n, in_n, pooled ? &p : nullptr, yp + pl * out_n, k, buf);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CPU, m) {
  m.impl("quantize.affine_table", &geta_kernels::affine_table_cpu);
}
