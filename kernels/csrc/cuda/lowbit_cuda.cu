// CUDA kernels for geta::lowbit_linear and geta::unpack_weight.
//
// STATUS: UNTESTED.  Written without a GPU (compile-checked with nvcc 13.0 for sm_90 only).  It
// is built only on request (GETA_FX_BUILD_LOWBIT_CUDA=1, see geta_fx/lowbit_kernels.py); by
// default CUDA tensors use the pure-PyTorch reference.  Before enabling it by default, run
// tests/test_deploy.py (the cuda-marked tests compare it with the reference) and
// benchmarks/bench_deploy.py --tables b on a GPU.
//
// Schemas: geta_fx/ops/schema.py.  Contract and packed format: geta_fx/ops/lowbit.py.
//   packed uint8 [N, ceil(K/8)*B]: row n is a little-endian bitstream of K B-bit codes;
//   level = code - offset (2^(B-1) signed, 0 unsigned); weight = float(level) * scale.
//
// lowbit_linear:
//   M <= 16   weight-only GEMV/skinny GEMM: one warp per output row; each lane decodes 32 codes
//             at a time from 4*B bytes (one 16-byte load for B = 4) and accumulates the M dot
//             products in registers (level space; y = acc * scale + bias); warp shuffle reduce.
//             UNROLL chunks' loads are issued before their math (memory-level parallelism).
//   M > 16    dequantize into a temporary weight of x's dtype (bit-exact, like unpack_weight)
//             and call at::linear (cuBLAS): correct for any M.
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

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace geta_lowbit_cuda {
namespace {

constexpr int kMaxFusedM = 16;
constexpr int kWarpsPerBlock = 4;
constexpr int kUnroll = 2;

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

// Code j (0..31) of a 32-code chunk held in BITS 32-bit little-endian words.
template <int BITS>
__device__ __forceinline__ int code_at(const uint32_t (&w)[BITS], int j) {
  const int bit = j * BITS;
  const int word = bit >> 5, shift = bit & 31;
  uint32_t v = w[word] >> shift;
  if (shift + BITS > 32) v |= w[word + 1] << (32 - shift);  // straddles two words
  return static_cast<int>(v & ((1u << BITS) - 1));
}

// Load the 4*BITS bytes of chunk c of a row (bytes [c*4*BITS, (c+1)*4*BITS)), zero-filling past
// row_len.  `aligned`: the row starts on a 4-byte boundary and row_len is a multiple of 4.
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint8_t* row, int64_t row_len, int64_t c,
                                           bool aligned, uint32_t (&w)[BITS]) {
  const int64_t start = c * 4 * BITS;
  if (aligned && start + 4 * BITS <= row_len) {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(row + start);
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
    return;
  }
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    uint32_t v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t idx = start + 4 * i + b;
      if (idx < row_len) v |= static_cast<uint32_t>(__ldg(row + idx)) << (8 * b);
    }
    w[i] = v;
  }
}

// One warp per output row; m <= M <= kMaxFusedM rows of x (row stride K).  M is the register
// tile (1, 2, 4, 8 or 16; rows m..M-1 are skipped), so there are 5 instantiations per dtype/bits.
template <typename scalar_t, int BITS, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ packed,
                const float* __restrict__ scale, const scalar_t* __restrict__ bias,
                scalar_t* __restrict__ out, int m_rows, int64_t n, int64_t k, int64_t row_len,
                int offset, bool aligned) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= n) return;
  const uint8_t* row = packed + r * row_len;
  const int64_t chunks = (k + 31) / 32;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint32_t w[kUnroll][BITS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < chunks) load_chunk<BITS>(row, row_len, c, aligned, w[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      const int64_t k0 = c * 32;
      const bool full = k0 + 32 <= k;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if (!full && k0 + j >= k) break;
        const float lv = static_cast<float>(code_at<BITS>(w[u], j) - offset);
#pragma unroll
        for (int m = 0; m < M; ++m)
          if (m < m_rows) acc[m] = fmaf(to_f(x[m * k + k0 + j]), lv, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    acc[m] = v;
  }
  if (lane == 0) {
    const float s = *scale;
    const float b = bias != nullptr ? to_f(bias[r]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (m < m_rows) out[m * n + r] = static_cast<scalar_t>(fmaf(acc[m], s, b));
  }
}

// One thread per group of 8 codes: dst[r, g*8 + j] = float(code - offset) * scale (bit-exact).
template <typename out_t>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                              out_t* __restrict__ dst, int64_t n, int64_t k, int64_t row_len,
                              int bits, int offset) {
  const int64_t groups = (k + 7) / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * groups) return;
  const int64_t r = idx / groups, g = idx % groups;
  const uint8_t* src = packed + r * row_len + g * bits;
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(src[i]) << (8 * i);
  const float s = *scale;
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  for (int j = 0; j < 8; ++j) {
    const int64_t col = g * 8 + j;
    if (col >= k) break;
    const int code = static_cast<int>((word >> (j * bits)) & mask);
    dst[r * k + col] = static_cast<out_t>(__fmul_rn(static_cast<float>(code - offset), s));
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
      packed.size(1), static_cast<int>(bits), offset);
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

template <typename scalar_t, int BITS>
void launch_gemv_bits(int m, const at::Tensor& x2, const at::Tensor& packed,
                      const at::Tensor& scale, const scalar_t* bias, at::Tensor& out, int64_t n,
                      int64_t k, int offset) {
  const int64_t row_len = packed.size(1);
  const bool aligned = row_len % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(packed.data_ptr<uint8_t>()) % 4 == 0;
  const unsigned blocks = static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x2.data_ptr<scalar_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  TORCH_CHECK(m >= 1 && m <= kMaxFusedM, "geta::lowbit_linear: internal error: fused M");
#define GETA_GEMV_LAUNCH(MM)                                                                    \
  gemv_kernel<scalar_t, BITS, MM><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(                \
      xp, pp, sp, bias, op, m, n, k, row_len, offset, aligned)
  if (m <= 1) {
    GETA_GEMV_LAUNCH(1);
  } else if (m <= 2) {
    GETA_GEMV_LAUNCH(2);
  } else if (m <= 4) {
    GETA_GEMV_LAUNCH(4);
  } else if (m <= 8) {
    GETA_GEMV_LAUNCH(8);
  } else {
    GETA_GEMV_LAUNCH(16);
  }
#undef GETA_GEMV_LAUNCH
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
