// CPU kernel of geta::quantize.table: an activation quantizer's levels read from a threshold
// table (two gathers per vector) instead of exp/log per element.
//
// Schema: geta_fx/ops/schema.py.  Contract and reference: geta_fx/ops/quantize_table.py (the
// oracle; this kernel agrees with it bit for bit).  One pass over x in float32: AVX-512 (16
// lanes, masked tail) or AVX2 (8 lanes, scalar tail) intrinsics in the libraries compiled for
// those capabilities, the scalar element function of quantize_table_common.h elsewhere.
// float16/bfloat16 inputs are converted to float32 first and the result back (round to
// nearest even), as the reference does.

#include "../quantize_table_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace geta_kernels {
namespace {

// Elements per parallel block (fixed: the result does not depend on the thread count anyway).
constexpr int64_t kTableBlock = 16384;

struct Table {
  float d, q, scale;
  int32_t cells;
  const int32_t* bounds;
  const int32_t* base;
};

template <bool SIGNED>
void table_span(const float* x, float* y, int64_t n, const Table& k) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vq = _mm512_set1_ps(k.q), vs = _mm512_set1_ps(k.scale), vd = _mm512_set1_ps(k.d);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i top = _mm512_set1_epi32(k.cells - 1), izero = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1), sign = _mm512_set1_epi32(INT32_MIN);
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __m512 m = _mm512_min_ps(_mm512_abs_ps(v), vq);  // NaN -> q (second operand)
    __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(m, vs));
    j = _mm512_min_epi32(_mm512_max_epi32(j, izero), top);
    const __m512i bnd = _mm512_i32gather_epi32(j, k.bounds, 4);
    __m512i lvl = _mm512_i32gather_epi32(j, k.base, 4);
    const __mmask16 ge = _mm512_cmpge_epi32_mask(_mm512_castps_si512(m), bnd);
    lvl = _mm512_mask_add_epi32(lvl, ge, lvl, one);
    __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(lvl), vd);
    if constexpr (SIGNED) {
      const __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
      out = _mm512_castsi512_ps(
          _mm512_mask_xor_epi32(_mm512_castps_si512(out), neg, _mm512_castps_si512(out), sign));
    } else {
      out = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), out);
    }
    out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
    _mm512_mask_storeu_ps(y + i, live, out);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 vq = _mm256_set1_ps(k.q), vs = _mm256_set1_ps(k.scale), vd = _mm256_set1_ps(k.d);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MAX));
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
  const __m256i top = _mm256_set1_epi32(k.cells - 1), izero = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 m = _mm256_min_ps(_mm256_and_ps(v, absmask), vq);  // NaN -> q
    __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(m, vs));
    j = _mm256_min_epi32(_mm256_max_epi32(j, izero), top);
    const __m256i bnd = _mm256_i32gather_epi32(k.bounds, j, 4);
    const __m256i lvl0 = _mm256_i32gather_epi32(k.base, j, 4);
    // level = base + (bits(m) >= bound) = base + 1 + (bound > bits(m) ? -1 : 0)
    const __m256i gt = _mm256_cmpgt_epi32(bnd, _mm256_castps_si256(m));
    const __m256i lvl = _mm256_add_epi32(_mm256_add_epi32(lvl0, one), gt);
    __m256 out = _mm256_mul_ps(_mm256_cvtepi32_ps(lvl), vd);
    if constexpr (SIGNED) {
      out = _mm256_xor_ps(out, _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), sign));
    } else {
      out = _mm256_and_ps(out, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
    }
    out = _mm256_blendv_ps(out, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm256_storeu_ps(y + i, out);
  }
#endif
  for (; i < n; ++i) {
    y[i] = table_quantize(x[i], k.q, k.scale, k.d, k.cells, k.bounds, k.base, SIGNED);
  }
}

void check_cpu_table(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got ",
              x.device().str());
}

at::Tensor quantize_table_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& q_m,
                              const at::Tensor& t, bool is_signed, const at::Tensor& scale,
                              const at::Tensor& bounds, const at::Tensor& base) {
  constexpr const char* op = "geta::quantize.table";
  check_quantize_table_inputs(op, x, d, q_m, t, scale, bounds, base);
  check_cpu_table(op, x);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  if (x.scalar_type() != c10::ScalarType::Float) {  // computed in float32, cast back (RNE)
    y.copy_(quantize_table_cpu(x.to(at::kFloat), d, q_m, t, is_signed, scale, bounds, base));
    return y;
  }
  const at::Tensor xd = in_layout_of(x, y);
  const at::Tensor bc = bounds.contiguous(), bs = base.contiguous();
  const Table k{d.const_data_ptr<float>()[0], q_m.const_data_ptr<float>()[0],
                scale.const_data_ptr<float>()[0], static_cast<int32_t>(bc.numel()),
                bc.const_data_ptr<int32_t>(), bs.const_data_ptr<int32_t>()};
  const float* xp = xd.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks = (n + kTableBlock - 1) / kTableBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kTableBlock;
      const int64_t len = std::min(kTableBlock, n - begin);
      if (is_signed) {
        table_span<true>(xp + begin, yp + begin, len, k);
      } else {
        table_span<false>(xp + begin, yp + begin, len, k);
      }
    }
  });
  return y;
}

}  // namespace
}  // namespace geta_kernels

// No TORCH_LIBRARY here: the schemas are defined once, in geta_fx/ops/schema.py.
TORCH_LIBRARY_IMPL(geta, CPU, m) {
  m.impl("quantize.table", &geta_kernels::quantize_table_cpu);
}
