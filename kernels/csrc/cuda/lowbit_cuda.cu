// CUDA kernels for geta::lowbit_linear and geta::unpack_weight.
//
// STATUS: tested on an NVIDIA H200 (tests/test_deploy.py, CUDA-marked: bit-exact unpack for
// 2-8 bits and every dtype, lowbit_linear vs a float64 oracle for M in {0, 1, 3, 16, 17, 40},
// ragged K, unaligned packed rows), when the fused kernel served M <= 16; since then M > 4
// takes the (tested) dequantize + cuBLAS path, and the M = 2 tile (same template) has not run
// on a GPU.  A tuned GEMV, compile-checked only, is on branch gemv-tuning.  Built by default
// where torch has CUDA and nvcc exists (GETA_FX_BUILD_LOWBIT_CUDA=0 opts out, see
// geta_fx/lowbit_kernels.py).
//
// Schemas: geta_fx/ops/schema.py.  Contract and packed format: geta_fx/ops/lowbit.py.
//   packed uint8 [N, ceil(K/8)*B]: row n is a little-endian bitstream of K B-bit codes;
//   level = code - offset (2^(B-1) signed, 0 unsigned); weight = float(level) * scale.
//
// lowbit_linear:
//   M <= 4    weight-only GEMV (gemv_kernel): a warp per 2 output rows, lanes on consecutive
//             groups of 8 codes (coalesced weight and activation loads), M x 2 float32
//             accumulators in registers (level space; y = acc * scale + bias).  H200, 4-bit,
//             M = 1: 1.45x faster than fp16 F.linear (the issue's goal is 2.5-3x).
//   M > 4     dequantize into a temporary weight of x's dtype (bit-exact, like unpack_weight)
//             and call at::linear (cuBLAS): correct for any M, ~0.5x fp16 speed.
// unpack_weight: one thread per group of 8 codes, float(level) * scale with __fmul_rn.
// Scale is read on the device (no host sync); everything runs on the current stream.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace geta_lowbit_cuda {
namespace {

// The fused kernel serves M <= 4; taller x goes through dequantize + cuBLAS.  Measured on an
// H200 (benchmarks/README.md "Deploy"): at M = 8 the fused kernel took 43 us for 4096x4096 W4
// vs ~27 us for dequantize + cuBLAS; Nsight Compute showed it stalled on L1 (the activation
// loads, ~70% of stall cycles) with 0.8 waves of 95-register warps.  See the TODO at gemv_kernel.
constexpr int kMaxFusedM = 4;
constexpr int kWarpsPerBlock = 4;

std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

bool is_float_dtype(c10::ScalarType s) {
  return s == c10::ScalarType::Float || s == c10::ScalarType::Half ||
         s == c10::ScalarType::BFloat16;
}

int64_t row_bytes(int64_t k, int64_t bits) { return (k + 7) / 8 * bits; }

void check_packed(const char* who, const at::Tensor& packed, const at::Tensor& scale, int64_t bits,
                  int64_t n, int64_t k, const c10::Device& device) {
  TORCH_CHECK(bits >= 2 && bits <= 8, who, ": bits must be in [2, 8], got ", std::to_string(bits));
  TORCH_CHECK(packed.scalar_type() == c10::ScalarType::Byte, who, ": packed must be uint8, got ",
              c10::toString(packed.scalar_type()));
  TORCH_CHECK(packed.dim() == 2, who, ": packed must be 2-D [N, ceil(K/8)*bits], got shape ",
              shape_str(packed.sizes()));
  if (n >= 0) {
    TORCH_CHECK(packed.size(0) == n, who, ": packed has ", std::to_string(packed.size(0)),
                " rows, expected ", std::to_string(n));
  }
  TORCH_CHECK(packed.size(1) == row_bytes(k, bits), who, ": packed rows have ",
              std::to_string(packed.size(1)), " bytes, expected ceil(", std::to_string(k), "/8)*",
              std::to_string(bits), " = ", std::to_string(row_bytes(k, bits)));
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == c10::ScalarType::Float, who,
              ": scale must be float32 with one element, got ", c10::toString(scale.scalar_type()),
              " shape ", shape_str(scale.sizes()));
  TORCH_CHECK(packed.device() == device, who, ": packed is on ", packed.device().str(),
              ", expected ", device.str());
  TORCH_CHECK(scale.device() == device, who, ": scale is on ", scale.device().str(),
              ", expected ", device.str());
}

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
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

__device__ __forceinline__ void load8(const c10::Half* p, bool vec, int valid, float (&v)[8]) {
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
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? static_cast<float>(p[j]) : 0.f;
  }
}

__device__ __forceinline__ void load8(const c10::BFloat16* p, bool vec, int valid,
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
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? static_cast<float>(p[j]) : 0.f;
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
// BITS-byte-load boundary for BITS in {2, 4, 8} (one 2/4/8-byte load); other widths (and
// unaligned rows) assemble the group from byte loads.  Lanes read consecutive groups, so a warp's
// loads cover 32*BITS contiguous bytes.
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

// Weight-only GEMV / skinny GEMM.  Each warp owns R consecutive output rows.  The K axis is cut
// into groups of 8 codes (BITS bytes); lane l takes groups l, l+32, l+64, ... so that at every
// step the warp reads 32 consecutive groups: 32*BITS contiguous weight bytes per row and 256
// contiguous activations per x row (one 16-byte load per lane: 4 L1 wavefronts, the minimum).
// UNROLL steps x R rows of weight loads are issued before any math.  Per group the R rows' 8
// levels are decoded once and each activation row's 8 values are loaded once and used for the R
// rows: M*R float32 accumulators in registers, warp-shuffle reduced at the end (fixed order:
// deterministic).  y = acc * scale + bias: the sum runs in level space (scale is per tensor).
// M is the register tile (1, 2, 4, 8 or 16): activation rows m_rows..M-1 are skipped.
// TODO(perf, measured with Nsight Compute on an H200, 4096x4096 W4 fp16): at M = 1 the grid is
// 2048 warps (24% achieved occupancy, DRAM 14% busy): latency bound.  Next steps: one row per
// warp or split-K across the block's warps (more warps and loads in flight); at M > 1 hoist the
// M activation loads of a group ahead of their FMAs (the `m < m_rows` guard and the vector /
// element branch in load8 keep them serialised: clamp the row instead and peel the ragged
// group); consider mma.sync with levels converted to fp16/bf16 (exact for |level| <= 256).
template <typename scalar_t, int BITS, int M, int R, int UNROLL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ packed,
                const float* __restrict__ scale, const scalar_t* __restrict__ bias,
                scalar_t* __restrict__ out, int m_rows, int64_t n, int64_t k, int64_t row_len,
                int offset, bool aligned, bool x_vec) {
  const int lane = threadIdx.x & 31;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * R;
  if (r0 >= n) return;
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

  for (int64_t g0 = lane; g0 < groups; g0 += 32 * UNROLL) {
    Group<BITS> w[UNROLL][R];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t gi = g0 + 32 * u;
      if (gi < groups) {
#pragma unroll
        for (int rr = 0; rr < R; ++rr) load_group<BITS>(rows[rr], gi, aligned, w[u][rr]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t gi = g0 + 32 * u;
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
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      float v = acc[m][rr];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m][rr] = v;
    }
  // Lane i stores output (m, rr) = divmod(i, R) (then i + 32, ...): the stores are spread.
  const float s = __ldg(scale);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int64_t r = r0 + rr;
      if ((m * R + rr) % 32 == lane && m < m_rows && r < n) {
        const float b = bias != nullptr ? to_f(bias[r]) : 0.f;
        out[m * n + r] = static_cast<scalar_t>(fmaf(acc[m][rr], s, b));
      }
    }
}

// One thread per group of 8 codes: dst[r, g*8 + j] = float(code - offset) * scale (bit-exact,
// __fmul_rn so no contraction).  `vec`: k % 8 == 0 and dst 16-byte aligned, so the 8 outputs
// are written with 16-byte stores.
template <typename out_t>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                              out_t* __restrict__ dst, int64_t n, int64_t k, int64_t row_len,
                              int bits, int offset, bool vec) {
  const int64_t groups = (k + 7) / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * groups) return;
  const int64_t r = idx / groups, g = idx % groups;
  const uint8_t* src = packed + r * row_len + g * bits;
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(__ldg(src + i)) << (8 * i);
  const float s = __ldg(scale);
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  out_t v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int code = static_cast<int>((word >> (j * bits)) & mask);
    v[j] = static_cast<out_t>(__fmul_rn(static_cast<float>(code - offset), s));
  }
  out_t* d = dst + r * k + g * 8;
  if (vec) {
    static_assert(sizeof(v) % 16 == 0, "8 outputs are 16 or 32 bytes");
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(v) / 16); ++i) {
      uint4 u;
      memcpy(&u, reinterpret_cast<const char*>(v) + 16 * i, 16);
      reinterpret_cast<uint4*>(d)[i] = u;
    }
  } else {
    for (int j = 0; j < 8 && g * 8 + j < k; ++j) d[j] = v[j];
  }
}

template <typename out_t>
void launch_unpack(const at::Tensor& packed, const at::Tensor& scale, at::Tensor& out, int64_t n,
                   int64_t k, int64_t bits, int offset) {
  const int64_t total = n * ((k + 7) / 8);
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  unpack_kernel<out_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), out.data_ptr<out_t>(), n, k,
      packed.size(1), static_cast<int>(bits), offset,
      k % 8 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr<out_t>()) % 16 == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unpack_into(const at::Tensor& packed, const at::Tensor& scale, at::Tensor& out, int64_t n,
                 int64_t k, int64_t bits, bool is_signed) {
  const int offset = is_signed ? (1 << (bits - 1)) : 0;
  switch (out.scalar_type()) {
    case c10::ScalarType::Float: launch_unpack<float>(packed, scale, out, n, k, bits, offset); break;
    case c10::ScalarType::Half:
      launch_unpack<c10::Half>(packed, scale, out, n, k, bits, offset);
      break;
    default: launch_unpack<c10::BFloat16>(packed, scale, out, n, k, bits, offset); break;
  }
}

template <typename scalar_t, int BITS, int M>
void launch_gemv_tile(int m, const scalar_t* xp, const uint8_t* pp, const float* sp,
                      const scalar_t* bias, scalar_t* op, int64_t n, int64_t k, int64_t row_len,
                      int offset, bool aligned, bool x_vec, cudaStream_t stream) {
  // Two rows per warp share each activation load; fewer weight loads in flight for wide bits
  // and tall M keep the M*R accumulators + UNROLL*R*BITS words in registers (no spills).
  constexpr int R = 2;
  constexpr int UNROLL = M <= 2 ? 8 : 4;
  const int64_t warps = (n + R - 1) / R;
  const unsigned blocks = static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
  gemv_kernel<scalar_t, BITS, M, R, UNROLL><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      xp, pp, sp, bias, op, m, n, k, row_len, offset, aligned, x_vec);
}

template <typename scalar_t, int BITS>
void launch_gemv_bits(int m, const at::Tensor& x2, const at::Tensor& packed,
                      const at::Tensor& scale, const scalar_t* bias, at::Tensor& out, int64_t n,
                      int64_t k, int offset) {
  const int64_t row_len = packed.size(1);
  // BITS in {2, 4, 8}: group loads of BITS bytes; row_len = groups * BITS keeps every row
  // start aligned once the base pointer is.
  const bool aligned = reinterpret_cast<uintptr_t>(packed.data_ptr<uint8_t>()) % BITS == 0;
  // 8 activations per 16-byte load (two for fp32): every row start must stay aligned
  const bool x_vec = (k * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(x2.data_ptr<scalar_t>()) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x2.data_ptr<scalar_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  TORCH_CHECK(m >= 1 && m <= kMaxFusedM, "geta::lowbit_linear: internal error: fused M = ", m);
  if (m <= 1) {
    launch_gemv_tile<scalar_t, BITS, 1>(m, xp, pp, sp, bias, op, n, k, row_len, offset, aligned,
                                        x_vec, stream);
  } else if (m <= 2) {
    launch_gemv_tile<scalar_t, BITS, 2>(m, xp, pp, sp, bias, op, n, k, row_len, offset, aligned,
                                        x_vec, stream);
  } else {
    launch_gemv_tile<scalar_t, BITS, 4>(m, xp, pp, sp, bias, op, n, k, row_len, offset, aligned,
                                        x_vec, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gemv(int m, const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& bias, at::Tensor& out, int64_t n, int64_t k,
                 int64_t bits, bool is_signed) {
  const int offset = is_signed ? (1 << (bits - 1)) : 0;
  const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  switch (bits) {
    case 2: launch_gemv_bits<scalar_t, 2>(m, x2, packed, scale, b, out, n, k, offset); break;
    case 3: launch_gemv_bits<scalar_t, 3>(m, x2, packed, scale, b, out, n, k, offset); break;
    case 4: launch_gemv_bits<scalar_t, 4>(m, x2, packed, scale, b, out, n, k, offset); break;
    case 5: launch_gemv_bits<scalar_t, 5>(m, x2, packed, scale, b, out, n, k, offset); break;
    case 6: launch_gemv_bits<scalar_t, 6>(m, x2, packed, scale, b, out, n, k, offset); break;
    case 7: launch_gemv_bits<scalar_t, 7>(m, x2, packed, scale, b, out, n, k, offset); break;
    default: launch_gemv_bits<scalar_t, 8>(m, x2, packed, scale, b, out, n, k, offset); break;
  }
}

at::Tensor unpack_weight_cuda(const at::Tensor& packed, const at::Tensor& scale, int64_t bits,
                              bool is_signed, c10::IntArrayRef shape, c10::ScalarType dtype) {
  const char* who = "geta::unpack_weight";
  TORCH_CHECK(is_float_dtype(dtype), who, ": dtype must be float32, float16 or bfloat16, got ",
              c10::toString(dtype));
  TORCH_CHECK(!shape.empty(), who, ": shape must have at least one dim");
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t n = shape.size() >= 2 ? shape[0] : 1;
  const int64_t k = n ? numel / n : 0;
  check_packed(who, packed, scale, bits, n, k, packed.device());
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const at::Tensor p = packed.contiguous();
  unpack_into(p, scale, out, n, k, bits, is_signed);
  return out;
}

at::Tensor lowbit_linear_cuda(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, int64_t bits, int64_t in_features,
                              bool is_signed, const c10::optional<at::Tensor>& bias) {
  const char* who = "geta::lowbit_linear";
  TORCH_CHECK(is_float_dtype(x.scalar_type()), who,
              ": x must be float32, float16 or bfloat16, got ", c10::toString(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, who, ": x must have at least one dim");
  TORCH_CHECK(x.size(-1) == in_features, who, ": x has ", std::to_string(x.size(-1)),
              " features, expected ", std::to_string(in_features));
  check_packed(who, packed, scale, bits, -1, in_features, x.device());
  const int64_t n = packed.size(0), k = in_features;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, who, ": bias must be [", std::to_string(n),
                "], got ", shape_str(b.sizes()));
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), who, ": bias dtype ",
                c10::toString(b.scalar_type()), " != x dtype ", c10::toString(x.scalar_type()));
    TORCH_CHECK(b.device() == x.device(), who, ": bias is on ", b.device().str(), ", x on ",
                x.device().str());
  }
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  if (rows == 0 || n == 0) return at::empty(out_shape, x.options());
  const at::Tensor p = packed.contiguous();
  if (rows <= kMaxFusedM && k > 0) {
    const at::Tensor x2 = x.reshape({rows, k}).contiguous();
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    at::Tensor out = at::empty({rows, n}, x.options());
    const int m = static_cast<int>(rows);
    switch (x.scalar_type()) {
      case c10::ScalarType::Float:
        launch_gemv<float>(m, x2, p, scale, b, out, n, k, bits, is_signed);
        break;
      case c10::ScalarType::Half:
        launch_gemv<c10::Half>(m, x2, p, scale, b, out, n, k, bits, is_signed);
        break;
      default:
        launch_gemv<c10::BFloat16>(m, x2, p, scale, b, out, n, k, bits, is_signed);
    }
    return out.reshape(out_shape);
  }
  // Any M: dequantize (bit-exact, in x's dtype) and use cuBLAS through at::linear.
  at::Tensor w = at::empty({n, k}, x.options());
  unpack_into(p, scale, w, n, k, bits, is_signed);
  return at::linear(x, w, bias);
}

}  // namespace
}  // namespace geta_lowbit_cuda

TORCH_LIBRARY_IMPL(geta, CUDA, m) {
  m.impl("lowbit_linear", &geta_lowbit_cuda::lowbit_linear_cuda);
  m.impl("unpack_weight", &geta_lowbit_cuda::unpack_weight_cuda);
}
