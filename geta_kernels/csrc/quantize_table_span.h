// The vectorised CPU element loop of geta::quantize.table (AVX-512 / AVX2 / scalar), shared by
// the CPU kernels of geta::quantize.table (cpu/quantize_table_cpu.cpp) and .affine_table
// (cpu/affine_table_cpu.cpp).  Contract: geta_fx/ops/quantize_table.py.  Nothing here registers
// anything; each including source gets its own copy (anonymous namespace).
#pragma once

#include "quantize_table_common.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace geta_kernels {
namespace {

// Elements per parallel block (fixed: the result does not depend on the thread count anyway).
constexpr int64_t kTableBlock = 16384;

struct Table {
  float d, q, scale;
  int32_t cells;
  const int32_t* bounds;
  const int32_t* base;
  // AVX-512: cell j's (base << 32 | bounds) (table_pairs), so one 8-lane 64-bit gather fetches
  // both words of 8 lookups: half the gathered elements of two 16-lane 32-bit gathers.
  const int64_t* pairs = nullptr;
};

// The interleaved form of Table::pairs (cells * 8 bytes; built per call, 4 KB at 8 bits).
inline std::vector<int64_t> table_pairs(const int32_t* bounds, const int32_t* base,
                                        int32_t cells) {
  std::vector<int64_t> pairs(static_cast<size_t>(cells));
  for (int32_t j = 0; j < cells; ++j) {
    pairs[j] = static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(base[j])) << 32) |
                                    static_cast<uint32_t>(bounds[j]));
  }
  return pairs;
}

// A kernel call's Table (and the tensors / interleaved pairs it points into).
struct TableArgs {
  at::Tensor bounds, base;
  std::vector<int64_t> pairs;
  Table k;
};

inline TableArgs table_args(const at::Tensor& d, const at::Tensor& q_m, const at::Tensor& scale,
                            const at::Tensor& bounds, const at::Tensor& base) {
  TableArgs a{bounds.contiguous(), base.contiguous(), {}, {}};
  const int32_t cells = static_cast<int32_t>(a.bounds.numel());
  const int32_t* bp = a.bounds.const_data_ptr<int32_t>();
  const int32_t* sp = a.base.const_data_ptr<int32_t>();
#if defined(CPU_CAPABILITY_AVX512)
  a.pairs = table_pairs(bp, sp, cells);
#endif
  a.k = Table{d.const_data_ptr<float>()[0], q_m.const_data_ptr<float>()[0],
              scale.const_data_ptr<float>()[0], cells, bp, sp,
              a.pairs.empty() ? nullptr : a.pairs.data()};
  return a;
}

template <bool SIGNED>
void table_span(const float* x, float* y, int64_t n, const Table& k) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vq = _mm512_set1_ps(k.q), vs = _mm512_set1_ps(k.scale), vd = _mm512_set1_ps(k.d);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i top = _mm512_set1_epi32(k.cells - 1), izero = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1), sign = _mm512_set1_epi32(INT32_MIN);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, one);
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __m512 m = _mm512_min_ps(_mm512_abs_ps(v), vq);  // NaN -> q (second operand)
    __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(m, vs));
    j = _mm512_min_epi32(_mm512_max_epi32(j, izero), top);
    __m512i bnd, lvl;
    if (k.pairs != nullptr) {
      const __m512i lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(j), k.pairs, 8);
      const __m512i hi = _mm512_i32gather_epi64(_mm512_extracti32x8_epi32(j, 1), k.pairs, 8);
      bnd = _mm512_permutex2var_epi32(lo, even, hi);
      lvl = _mm512_permutex2var_epi32(lo, odd, hi);
    } else {
      bnd = _mm512_i32gather_epi32(j, k.bounds, 4);
      lvl = _mm512_i32gather_epi32(j, k.base, 4);
    }
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

}  // namespace
}  // namespace geta_kernels
