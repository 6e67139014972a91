// Weight-only low-bit GEMV / skinny GEMM device code, shared by the torch extension
// (lowbit_cuda.cu) and the standalone tuning lab (benchmarks/cuda_lab/gemv_lab.cu).  No torch
// headers: activations are float, __half or __nv_bfloat16 (c10::Half / c10::BFloat16 have the
// same layout and are passed reinterpret_cast).
//
// Packed format (geta_fx/ops/lowbit.py): uint8 [N, ceil(K/8)*BITS]; row n is a little-endian
// bitstream of K BITS-bit codes; level = code - offset; weight = level * scale (per tensor).
//
// gemv_kernel<T, BITS, M, R, KW, UNROLL, HOIST>:
//   block = KW warps on the same R output rows (grid = ceil(N / R) blocks).  K is cut into
//   groups of 8 codes (BITS bytes); thread t of the block takes groups t, t + 32*KW, ... so at
//   every step the block reads 32*KW consecutive groups: coalesced weight bytes and 256*KW
//   contiguous activations per x row (16-byte loads).  UNROLL steps x R rows of weight loads
//   are issued before any math.  Per group the R rows' 8 levels are decoded once (magic-number
//   float, no I2F) and each of the M activation rows' 8 values is used for the R rows: M*R
//   float32 accumulators in registers, reduced with warp shuffles and (KW > 1) through shared
//   memory in a fixed order: deterministic.  HOIST issues a group's M activation loads before
//   its FMAs (tile rows past m_rows re-read the last row; never stored); otherwise each row's
//   load sits right before its FMAs behind an `m < m_rows` guard.
//   M is the register tile: activation rows m_rows..M-1 are skipped or discarded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace geta_gemv {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Eight consecutive activations as float32.  `vec`: all eight exist and start on a 16-byte
// boundary (one 16-byte load for fp16/bf16, two for fp32); otherwise element loads of the first
// `valid` and zeros after them.
__device__ __forceinline__ void load8(const float* p, bool vec, int valid, float (&v)[8]) {
  if (vec) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? __ldg(p + j) : 0.f;
  }
}

__device__ __forceinline__ void load8(const __half* p, bool vec, int valid, float (&v)[8]) {
  if (vec) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 f = __half22float2(h);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? __half2float(p[j]) : 0.f;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, bool vec, int valid,
                                      float (&v)[8]) {
  if (vec) {  // bf16 -> f32 is a shift: the low half goes to the top 16 bits
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? __bfloat162float(p[j]) : 0.f;
  }
}

// Words holding one group of 8 codes (8*BITS bits): 1 for BITS <= 4, else 2.
template <int BITS>
struct Group {
  static constexpr int kWords = BITS <= 4 ? 1 : 2;
  uint32_t w[kWords];
};

// Level of code j (0..7) of a group, as an exact float: the code is OR-ed into the mantissa of
// 2^23 and (2^23 + offset) subtracted, which avoids the quarter-rate integer->float conversion.
// j is a compile-time constant after unrolling: a shift, a LOP3 and an FADD.
template <int BITS>
__device__ __forceinline__ float level_at(const Group<BITS>& g, int j, float bias23) {
  const int bit = j * BITS;
  const int word = bit >> 5, shift = bit & 31;
  uint32_t v = g.w[word] >> shift;
  if (shift + BITS > 32) v |= g.w[word + 1] << (32 - shift);  // straddles the two words
  return __uint_as_float((v & ((1u << BITS) - 1)) | 0x4B000000u) - bias23;
}

// Group gi of a row: its BITS bytes start at byte gi*BITS.  `aligned`: rows start on a
// BITS-byte boundary for BITS in {2, 4, 8} (one 2/4/8-byte load); other widths (and unaligned
// rows) assemble the group from byte loads.
template <int BITS>
__device__ __forceinline__ void load_group(const uint8_t* row, int64_t gi, bool aligned,
                                           Group<BITS>& g) {
  const uint8_t* p = row + gi * BITS;
  if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
    if (aligned) {
      if constexpr (BITS == 2) {
        g.w[0] = __ldg(reinterpret_cast<const uint16_t*>(p));
      } else if constexpr (BITS == 4) {
        g.w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
      } else {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        g.w[0] = v.x;
        g.w[1] = v.y;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < Group<BITS>::kWords; ++i) g.w[i] = 0;
#pragma unroll
  for (int b = 0; b < BITS; ++b) g.w[b >> 2] |= static_cast<uint32_t>(__ldg(p + b)) << (8 * (b & 3));
}

template <typename T, int BITS, int M, int R, int KW, int UNROLL, bool HOIST>
__global__ void __launch_bounds__(KW * 32)
    gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                const float* __restrict__ scale, const T* __restrict__ bias, T* __restrict__ out,
                int m_rows, int64_t n, int64_t k, int64_t row_len, int offset, bool aligned,
                bool x_vec) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  if (r0 >= n) return;  // whole block
  const float bias23 = 8388608.f + static_cast<float>(offset);
  const int64_t groups = (k + 7) / 8;
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int rr = 0; rr < R; ++rr) acc[m][rr] = 0.f;
  // Rows past n alias the last row: loaded and summed, never stored (keeps the loop uniform).
  const uint8_t* rows[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) rows[rr] = packed + min(r0 + rr, n - 1) * row_len;

  for (int64_t g0 = threadIdx.x; g0 < groups; g0 += 32 * KW * UNROLL) {
    Group<BITS> w[UNROLL][R];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t gi = g0 + 32 * KW * u;
      if (gi < groups) {
#pragma unroll
        for (int rr = 0; rr < R; ++rr) load_group<BITS>(rows[rr], gi, aligned, w[u][rr]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t gi = g0 + 32 * KW * u;
      if (gi >= groups) break;
      const int64_t kk = gi * 8;
      // The last group may be ragged: its codes past k (padding) meet x = 0.
      const bool whole = x_vec && kk + 8 <= k;
      const int valid = k - kk < 8 ? static_cast<int>(k - kk) : 8;
      float lv[R][8];
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int j = 0; j < 8; ++j) lv[rr][j] = level_at<BITS>(w[u][rr], j, bias23);
      if constexpr (HOIST) {
        float xv[M][8];
        if (whole) {
#pragma unroll
          for (int m = 0; m < M; ++m) load8(x + min(m, m_rows - 1) * k + kk, true, 8, xv[m]);
        } else {
#pragma unroll
          for (int m = 0; m < M; ++m) load8(x + min(m, m_rows - 1) * k + kk, false, valid, xv[m]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][rr] = fmaf(xv[m][j], lv[rr][j], acc[m][rr]);
      } else {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < m_rows) {
            float xv[8];
            load8(x + m * k + kk, whole, valid, xv);
#pragma unroll
            for (int rr = 0; rr < R; ++rr)
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[m][rr] = fmaf(xv[j], lv[rr][j], acc[m][rr]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      float v = acc[m][rr];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m][rr] = v;
    }
  if constexpr (KW > 1) {  // warp partial sums -> shared memory -> warp 0, fixed order
    __shared__ float partial[KW][M * R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
        if ((m * R + rr) % 32 == lane) partial[warp][m * R + rr] = acc[m][rr];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        float v = partial[0][m * R + rr];
#pragma unroll
        for (int wi = 1; wi < KW; ++wi) v += partial[wi][m * R + rr];
        acc[m][rr] = v;
      }
  }
  // Lane i stores output (m, rr) with m*R + rr == i (mod 32): the stores are spread.
  const float s = __ldg(scale);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int64_t r = r0 + rr;
      if ((m * R + rr) % 32 == lane && m < m_rows && r < n) {
        const float b = bias != nullptr ? to_f(bias[r]) : 0.f;
        out[m * n + r] = from_f<T>(fmaf(acc[m][rr], s, b));
      }
    }
}

// Block size and grid of a configuration (host side).
template <int R, int KW>
inline unsigned gemv_grid(int64_t n) {
  return static_cast<unsigned>((n + R - 1) / R);
}

}  // namespace geta_gemv
