// CPU kernels for geta::lowbit_linear and geta::unpack_weight (deployment of packed weights).
//
// Schemas: geta_fx/ops/schema.py (defined once, in Python).  Contract and packed format:
// geta_fx/ops/lowbit.py (the reference is the oracle).  This file only registers CPU
// implementations of those schemas; it is built and loaded by geta_fx/lowbit_kernels.py.
//
// Format recap: packed is uint8 [N, ceil(K/8) * B]; row n is a little-endian bitstream of K
// B-bit codes (every 8 codes are exactly B bytes); level = code - offset (offset = 2^(B-1) signed,
// 0 unsigned); weight = float(level) * scale.
//
// lowbit_linear, M = rows of x:
//   M <= kFusedMaxM  fused, the packed weight is read once and no float weight exists in memory:
//                    AVX-512 (when the loader compiles for it): dot products in level space
//                    straight from the packed bytes (see fused_linear_avx512); portable: each
//                    thread decodes one weight row at a time into an L1-resident float buffer
//                    (float(level) * scale, as in the reference) and dots it with all M rows.
//   M >  kFusedMaxM  the weight is decoded once per call (parallel over rows) into a float32
//                    matrix and multiplied with ATen's GEMM (decode is O(NK) vs the GEMM's O(MNK)).
// All compute in float32 (fp16/bf16 activations are widened; the output is rounded once to x's
// dtype), so they agree with the reference to float rounding of the matmul.  unpack_weight and
// the M > kFusedMaxM decode are bit-identical to the reference's dequantized weight.

#include "../lowbit_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
#define GETA_LOWBIT_AVX512 1  // the loader compiles with ATen's AVX-512 flags on such CPUs
#endif
#if defined(__BMI2__) || defined(GETA_LOWBIT_AVX512)
#include <immintrin.h>
#endif

namespace geta_lowbit {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kFusedMaxM = 16;  // rows of x up to which the fused decode+dot path runs
constexpr int64_t kRowGrain = 16;   // weight rows per parallel task (fused path)

// ---------------------------------------------------------------------------------------------
// Row decoding: packed bytes -> one uint8 code per element -> float(code - offset) * scale.
// Every group of 8 codes is exactly `bits` bytes; with BMI2 one PDEP spreads a group's 8*bits
// bits into 8 bytes.  The float conversion is a plain loop the compiler vectorises
// (zero-extend, int -> float, multiply).  Output: dst[0 .. groups*8); padding codes are
// `offset`, i.e. level 0, i.e. +0.0f.
// ---------------------------------------------------------------------------------------------
#if defined(__BMI2__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define GETA_LOWBIT_PDEP 1
#endif

// `bits`-bit field at the bottom of each of the 8 bytes of a word.
constexpr uint64_t spread_mask(int bits) {
  uint64_t field = (uint64_t{1} << bits) - 1, m = 0;
  for (int j = 0; j < 8; ++j) m |= field << (8 * j);
  return m;
}

inline uint64_t load_group_safe(const uint8_t* src, int bits) {
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(src[i]) << (8 * i);
  return word;
}

// packed row (groups * bits bytes) -> codes[groups * 8]
inline void decode_codes(const uint8_t* src, int64_t groups, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, src, static_cast<size_t>(groups) * 8);
    return;
  }
#ifdef GETA_LOWBIT_PDEP
  const uint64_t spread = spread_mask(bits);
  int64_t g = 0;
  // An 8-byte load reads past the group's `bits` bytes: safe for every group but the row's
  // last one (the bytes belong to the same row); PDEP only consumes the low 8*bits bits.
  for (; g + 1 < groups; ++g) {
    uint64_t word;
    std::memcpy(&word, src + g * bits, 8);
    const uint64_t out = _pdep_u64(word, spread);
    std::memcpy(codes + g * 8, &out, 8);
  }
  if (g < groups) {
    const uint64_t out = _pdep_u64(load_group_safe(src + g * bits, bits), spread);
    std::memcpy(codes + g * 8, &out, 8);
  }
#else
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t word = load_group_safe(src + g * bits, bits);
    for (int j = 0; j < 8; ++j) codes[g * 8 + j] = static_cast<uint8_t>((word >> (j * bits)) & mask);
  }
#endif
}

struct Decoder {
  int bits;
  int offset;
  float scale;

  Decoder(int bits_, bool is_signed, float scale_)
      : bits(bits_), offset(is_signed ? (1 << (bits_ - 1)) : 0), scale(scale_) {}

  // Decode `groups` groups of 8 codes into dst[groups * 8]; `codes` is scratch [groups * 8].
  // float(code - offset) * scale: the reference's float32(level) * scale, one IEEE multiply.
  void row(const uint8_t* src, int64_t groups, uint8_t* codes, float* dst) const {
#ifdef GETA_LOWBIT_AVX512
    if (bits == 2 || bits == 4 || bits == 8) {
      row_avx512(src, groups, dst);
      return;
    }
#endif
    decode_codes(src, groups, bits, codes);
    to_float(codes, groups * 8, dst);
  }

  void to_float(const uint8_t* codes, int64_t n, float* dst) const {
    const int32_t off = offset;
    const float d = scale;
    int64_t i = 0;
#ifdef GETA_LOWBIT_AVX512
    for (; i + 16 <= n; i += 16)
      codes16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)), dst + i);
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(static_cast<int32_t>(codes[i]) - off) * d;
  }

#ifdef GETA_LOWBIT_AVX512
  // 16 codes in natural order (one per byte) -> 16 floats, bit-exact with the scalar formula.
  void codes16(__m128i c, float* dst) const {
    const __m512i lv = _mm512_sub_epi32(_mm512_cvtepu8_epi32(c), _mm512_set1_epi32(offset));
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(lv), _mm512_set1_ps(scale)));
  }

  // 2/4/8 bits: 16 packed bytes at a time, codes spread to bytes in natural order with byte
  // shifts/masks and unpack (interleave) instructions; scalar tail.
  void row_avx512(const uint8_t* src, int64_t groups, float* dst) const {
    const int64_t nbytes = groups * bits, n = groups * 8;
    int64_t jb = 0;
    if (bits == 8) {
      for (; jb + 16 <= nbytes; jb += 16)
        codes16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + jb)), dst + jb);
    } else if (bits == 4) {
      const __m128i m4 = _mm_set1_epi8(0x0F);
      for (; jb + 16 <= nbytes; jb += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + jb));
        const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        codes16(_mm_unpacklo_epi8(lo, hi), dst + 2 * jb);
        codes16(_mm_unpackhi_epi8(lo, hi), dst + 2 * jb + 16);
      }
    } else {  // 2 bits
      const __m128i m2 = _mm_set1_epi8(0x03);
      for (; jb + 16 <= nbytes; jb += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + jb));
        const __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
        const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2);
        const __m128i c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
        const __m128i a_lo = _mm_unpacklo_epi8(c0, c1), a_hi = _mm_unpackhi_epi8(c0, c1);
        const __m128i b_lo = _mm_unpacklo_epi8(c2, c3), b_hi = _mm_unpackhi_epi8(c2, c3);
        codes16(_mm_unpacklo_epi16(a_lo, b_lo), dst + 4 * jb);
        codes16(_mm_unpackhi_epi16(a_lo, b_lo), dst + 4 * jb + 16);
        codes16(_mm_unpacklo_epi16(a_hi, b_hi), dst + 4 * jb + 32);
        codes16(_mm_unpackhi_epi16(a_hi, b_hi), dst + 4 * jb + 48);
      }
    }
    const int mask = (1 << bits) - 1;
    for (int64_t k = jb * 8 / bits; k < n; ++k) {  // tail: straight from the bitstream
      const int64_t bit = k * bits;
      const int code = (src[bit >> 3] >> (bit & 7)) & mask;  // 2/4/8 bits never straddle bytes
      dst[k] = static_cast<float>(code - offset) * scale;
    }
  }
#endif
};

// ---------------------------------------------------------------------------------------------
// dtype conversion helpers
// ---------------------------------------------------------------------------------------------
template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // round-to-nearest-even
}

template <>
void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

#ifndef GETA_LOWBIT_AVX512
// x [M, K] (any float dtype, contiguous) -> float32 [M, Kv] zero-padded (Kv >= K).
at::Tensor widen_padded(const at::Tensor& x2, int64_t kv) {
  const int64_t m = x2.size(0), k = x2.size(1);
  at::Tensor xf = at::zeros({m, kv}, x2.options().dtype(at::kFloat));
  at::Tensor src = x2.to(at::kFloat).contiguous();
  const float* s = src.data_ptr<float>();
  float* d = xf.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) std::memcpy(d + i * kv, s + i * k, k * sizeof(float));
  return xf;
}

// ---------------------------------------------------------------------------------------------
// fused decode + dot (M <= kFusedMaxM)
// ---------------------------------------------------------------------------------------------
// MT rows of x (stride kv) against one decoded weight row w[kv]; kv is a multiple of Vec::size().
template <int MT>
inline void dot_rows(const float* x, int64_t kv, const float* w, float* out) {
  Vec acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = Vec(0.f);
  for (int64_t k = 0; k < kv; k += Vec::size()) {
    const Vec wv = Vec::loadu(w + k);
    for (int i = 0; i < MT; ++i) acc[i] = at::vec::fmadd(Vec::loadu(x + i * kv + k), wv, acc[i]);
  }
  for (int i = 0; i < MT; ++i)
    out[i] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[i]);
}

void fused_linear(const at::Tensor& xf, const uint8_t* packed, int64_t row_stride, int64_t n,
                  int64_t groups, const Decoder& dec, const float* bias, float* out) {
  const int64_t m = xf.size(0), kv = xf.size(1);
  const float* x = xf.data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(static_cast<size_t>(kv), 0.f);  // tail beyond groups*8 stays 0
    std::vector<uint8_t> codes(static_cast<size_t>(groups * 8));
    float part[4];
    for (int64_t r = begin; r < end; ++r) {
      dec.row(packed + r * row_stride, groups, codes.data(), w.data());
      const float b = bias ? bias[r] : 0.f;
      int64_t i = 0;
      for (; i + 4 <= m; i += 4) {
        dot_rows<4>(x + i * kv, kv, w.data(), part);
        for (int j = 0; j < 4; ++j) out[(i + j) * n + r] = part[j] + b;
      }
      const int64_t rest = m - i;
      if (rest == 3) dot_rows<3>(x + i * kv, kv, w.data(), part);
      if (rest == 2) dot_rows<2>(x + i * kv, kv, w.data(), part);
      if (rest == 1) dot_rows<1>(x + i * kv, kv, w.data(), part);
      for (int j = 0; j < rest; ++j) out[(i + j) * n + r] = part[j] + b;
    }
  });
}

#endif  // !GETA_LOWBIT_AVX512

#ifdef GETA_LOWBIT_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 fused path: dot products in level space straight from the packed bytes.
//
// A 16-byte block of a row holds 16*P codes (P = 8/bits codes per byte for 2, 4, 8 bits): one
// zero-extension gives 16 int32 lanes (lane j = byte j), and phase p = (lane >> p*bits) & mask
// holds codes j*P + p.  x is permuted once per call into the same phase order, so
//     acc += float(code - offset) * x_perm      (16 codes per FMA, no scalar work)
// and y = acc * scale + bias.  Other bit widths (3, 5, 6, 7) are first spread to one code per
// byte with PDEP and then take the 8-bit path.  (Sums in level space, then one multiply by the
// scale: the reference's float32 rounding of the matmul may differ, as for any fused kernel.)
// ---------------------------------------------------------------------------------------------
template <int BITS, int MT>
inline void dot_blocks(const uint8_t* row, int64_t row_bytes, int64_t b0, int64_t b1,
                       const float* xp, int64_t kp, int offset, float* out) {
  constexpr int P = 8 / BITS;
  constexpr int BLK = 16 * P;
  const __m512i offv = _mm512_set1_epi32(offset);
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t full = row_bytes / 16;
  for (int64_t b = b0; b < b1; ++b) {
    __m128i bytes;
    if (b < full) {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    } else {  // the row's last partial block: never read past the row
      alignas(16) uint8_t tail[16] = {0};
      std::memcpy(tail, row + b * 16, static_cast<size_t>(row_bytes - b * 16));
      bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    const __m512i v = _mm512_cvtepu8_epi32(bytes);
    const float* xb = xp + b * BLK;
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m512i c = BITS == 8 ? v : _mm512_and_si512(_mm512_srli_epi32(v, p * BITS), mask);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, offv));
      for (int i = 0; i < MT; ++i)
        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + i * kp + p * 16), w, acc[i]);
    }
  }
  for (int i = 0; i < MT; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

template <int BITS>
inline void dot_tile(int mt, const uint8_t* row, int64_t row_bytes, int64_t b0, int64_t b1,
                     const float* xp, int64_t kp, int offset, float* out) {
  switch (mt) {
    case 1: dot_blocks<BITS, 1>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 2: dot_blocks<BITS, 2>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 3: dot_blocks<BITS, 3>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 4: dot_blocks<BITS, 4>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 5: dot_blocks<BITS, 5>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 6: dot_blocks<BITS, 6>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    case 7: dot_blocks<BITS, 7>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
    default: dot_blocks<BITS, 8>(row, row_bytes, b0, b1, xp, kp, offset, out); break;
  }
}

// x2 [M, K] -> float32 [M, kp] in the phase order of P codes per byte (zero padded).
at::Tensor permute_x(const at::Tensor& x2, int P, int64_t kp) {
  const int64_t m = x2.size(0), k = x2.size(1);
  const at::Tensor src = x2.to(at::kFloat).contiguous();
  at::Tensor xp = at::zeros({m, kp}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = xp.data_ptr<float>();
  const int64_t blk = 16 * P;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b * blk < k; ++b)
      for (int p = 0; p < P; ++p)
        for (int j = 0; j < 16; ++j) {
          const int64_t col = b * blk + j * P + p;
          if (col < k) d[i * kp + b * blk + p * 16 + j] = s[i * k + col];
        }
  return xp;
}

// Rows of the weight are split across threads; within a task the K dimension is walked in chunks
// whose x slice (M rows of floats) fits in kL1Bytes, so it stays in L1 while every weight row of
// the task passes (M = 1: whole rows).
constexpr int64_t kL1Bytes = 32 * 1024;

void fused_linear_avx512(const at::Tensor& x2, const uint8_t* packed, int64_t row_stride,
                         int64_t n, int64_t k, const Decoder& dec, const float* bias, float* out) {
  const int bits = dec.bits;
  const bool native = bits == 2 || bits == 4 || bits == 8;
  const int P = native ? 8 / bits : 1;
  const int64_t groups = (k + 7) / 8;
  const int64_t code_bytes = native ? row_stride : groups * 8;  // bytes the dot walks per row
  const int64_t nblocks = (code_bytes + 15) / 16;
  const int64_t kp = nblocks * 16 * P;
  const int64_t m = x2.size(0);
  const int64_t chunk_codes = std::max<int64_t>(512, kL1Bytes / (4 * std::max<int64_t>(m, 1)));
  const int64_t chunk = std::max<int64_t>(1, chunk_codes / (16 * P));  // blocks per K chunk
  const at::Tensor xp_t = permute_x(x2, P, kp);
  const float* xp = xp_t.data_ptr<float>();
  const float scale = dec.scale;
  const int tile_bits = native ? bits : 8;
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin;
    // 3/5/6/7 bits: one code per byte first.  One K chunk: decode each row right before its
    // dot (L1-hot); several chunks: decode the task's rows once up front.
    const bool one_chunk = nblocks <= chunk;
    std::vector<uint8_t> codes(native ? 0 : static_cast<size_t>((one_chunk ? 1 : rows) * code_bytes));
    if (!native && !one_chunk)
      for (int64_t r = 0; r < rows; ++r)
        decode_codes(packed + (begin + r) * row_stride, groups, bits, codes.data() + r * code_bytes);
    std::vector<float> acc(static_cast<size_t>(rows * m), 0.f);
    float part[8];
    for (int64_t b0 = 0; b0 < nblocks; b0 += chunk) {
      const int64_t b1 = std::min(nblocks, b0 + chunk);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = packed + (begin + r) * row_stride;
        if (!native && one_chunk) {
          decode_codes(row, groups, bits, codes.data());
          row = codes.data();
        } else if (!native) {
          row = codes.data() + r * code_bytes;
        }
        for (int64_t i = 0; i < m; i += 8) {
          const int mt = static_cast<int>(std::min<int64_t>(8, m - i));
          const float* xt = xp + i * kp;
          switch (tile_bits) {
            case 2: dot_tile<2>(mt, row, code_bytes, b0, b1, xt, kp, dec.offset, part); break;
            case 4: dot_tile<4>(mt, row, code_bytes, b0, b1, xt, kp, dec.offset, part); break;
            default: dot_tile<8>(mt, row, code_bytes, b0, b1, xt, kp, dec.offset, part); break;
          }
          for (int j = 0; j < mt; ++j) acc[r * m + i + j] += part[j];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float b = bias ? bias[begin + r] : 0.f;
      for (int64_t i = 0; i < m; ++i) out[i * n + begin + r] = acc[r * m + i] * scale + b;
    }
  });
}
#endif  // AVX-512

// Decode weight rows [0, n) into dst [n, K] of type T (parallel over rows).
template <typename T>
void decode_matrix(const uint8_t* packed, int64_t row_stride, int64_t n, int64_t k,
                   const Decoder& dec, T* dst) {
  const int64_t groups = (k + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(static_cast<size_t>(groups * 8));
    std::vector<uint8_t> codes(static_cast<size_t>(groups * 8));
    for (int64_t r = begin; r < end; ++r) {
      dec.row(packed + r * row_stride, groups, codes.data(), w.data());
      store_row<T>(w.data(), dst + r * k, k);
    }
  });
}

// M > kFusedMaxM: decode ~kChunkBytes of weight rows at a time into one reused float32 buffer
// (it stays in cache for the GEMM that reads it) and multiply it into the output's columns.
constexpr int64_t kChunkBytes = 8 << 20;

void chunked_linear(const at::Tensor& xf, const uint8_t* packed, int64_t row_stride, int64_t n,
                    int64_t k, const Decoder& dec, at::Tensor& out) {
  int64_t nb = std::max<int64_t>(16, kChunkBytes / (4 * std::max<int64_t>(k, 1)) / 16 * 16);
  nb = std::min(nb, n);
  at::Tensor w = at::empty({nb, k}, xf.options());
  for (int64_t n0 = 0; n0 < n; n0 += nb) {
    const int64_t c = std::min(nb, n - n0);
    decode_matrix<float>(packed + n0 * row_stride, row_stride, c, k, dec, w.data_ptr<float>());
    at::Tensor dst = out.narrow(1, n0, c);  // strides (n, 1): a valid BLAS output, no copy
    at::mm_out(dst, xf, w.narrow(0, 0, c).t());
  }
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------
at::Tensor unpack_weight_cpu(const at::Tensor& packed, const at::Tensor& scale, int64_t bits,
                             bool is_signed, c10::IntArrayRef shape, c10::ScalarType dtype) {
  const char* who = "geta::unpack_weight";
  // Inference op without an autograd formula: ATen calls made here must not see autograd
  // (mm_out refuses inputs that require grad, e.g. when a loaded module's params do).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::pair<int64_t, int64_t> nk = check_unpack_args(who, packed, scale, bits, shape, dtype);
  const int64_t n = nk.first, k = nk.second;
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor p = packed.contiguous();
  const Decoder dec(static_cast<int>(bits), is_signed, scale.item<float>());
  const uint8_t* src = p.data_ptr<uint8_t>();
  const int64_t stride = p.size(1);
  switch (dtype) {
    case c10::ScalarType::Float:
      decode_matrix<float>(src, stride, n, k, dec, out.data_ptr<float>());
      break;
    case c10::ScalarType::Half:
      decode_matrix<c10::Half>(src, stride, n, k, dec, out.data_ptr<c10::Half>());
      break;
    default:
      decode_matrix<c10::BFloat16>(src, stride, n, k, dec, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

at::Tensor lowbit_linear_cpu(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& scale, int64_t bits, int64_t in_features,
                             bool is_signed, const std::optional<at::Tensor>& bias) {
  const char* who = "geta::lowbit_linear";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see unpack_weight_cpu
  check_linear_args(who, x, packed, scale, bits, in_features, bias);
  const int64_t n = packed.size(0), k = in_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  const at::Tensor x2 = x.reshape({rows, k});
  if (rows == 0 || n == 0) return at::empty(out_shape, x.options());
  const at::Tensor p = packed.contiguous();
  const Decoder dec(static_cast<int>(bits), is_signed, scale.item<float>());
  const int64_t groups = (k + 7) / 8;
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();

  at::Tensor out_f;
  if (rows <= kFusedMaxM) {
#ifdef GETA_LOWBIT_AVX512
    out_f = at::empty({rows, n}, x.options().dtype(at::kFloat));
    fused_linear_avx512(x2, p.data_ptr<uint8_t>(), p.size(1), n, k, dec,
                        bias_f ? bias_f->data_ptr<float>() : nullptr, out_f.data_ptr<float>());
#else
    const int64_t kv = (groups * 8 + Vec::size() - 1) / Vec::size() * Vec::size();
    const at::Tensor xf = widen_padded(x2.contiguous(), kv);
    out_f = at::empty({rows, n}, x.options().dtype(at::kFloat));
    fused_linear(xf, p.data_ptr<uint8_t>(), p.size(1), n, groups, dec,
                 bias_f ? bias_f->data_ptr<float>() : nullptr, out_f.data_ptr<float>());
#endif
  } else {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    out_f = at::empty({rows, n}, x.options().dtype(at::kFloat));
    if (k == 0) {
      out_f.zero_();
    } else {
      chunked_linear(xf, p.data_ptr<uint8_t>(), p.size(1), n, k, dec, out_f);
    }
    if (bias_f) out_f.add_(*bias_f);
  }
  at::Tensor out = out_f.scalar_type() == x.scalar_type() ? out_f : out_f.to(x.scalar_type());
  return out.reshape(out_shape);
}

}  // namespace
}  // namespace geta_lowbit

TORCH_LIBRARY_IMPL(geta, CPU, m) {
  m.impl("lowbit_linear", &geta_lowbit::lowbit_linear_cpu);
  m.impl("unpack_weight", &geta_lowbit::unpack_weight_cpu);
}
