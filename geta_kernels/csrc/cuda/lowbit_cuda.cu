// CUDA kernels for geta::lowbit_linear and geta::unpack_weight.
//
// STATUS: tested on an NVIDIA H200 at commit b2bf9de (tests/test_deploy.py, CUDA-marked:
// bit-exact unpack for 2-8 bits and every dtype, lowbit_linear vs a float64 oracle for M in
// {0, 1, 3, 16, 17, 40}, ragged K, unaligned packed rows), when the fused kernel served M <= 16.
// Since then, not yet rerun on a GPU: M > 4 takes the (tested) dequantize + cuBLAS path; the
// GEMV moved to lowbit_gemv.cuh, generalised over (rows per warp, warps per row, hoisting) with
// the measured configuration as the one used here, one warp per block instead of four; the
// M = 2 tile has never run.  Built by default where torch has CUDA and nvcc exists
// (GETA_FX_BUILD_LOWBIT_CUDA=0 opts out, see geta_fx/lowbit_kernels.py).
//
// Schemas: geta_fx/ops/schema.py.  Contract and packed format: geta_fx/ops/lowbit.py.
//   packed uint8 [N, ceil(K/8)*B]: row n is a little-endian bitstream of K B-bit codes;
//   level = code - offset (2^(B-1) signed, 0 unsigned); weight = float(level) * scale.
//
// lowbit_linear:
//   M <= 4    weight-only GEMV (geta_gemv::gemv_kernel, lowbit_gemv.cuh): a warp per 2 output
//             rows, lanes on consecutive groups of 8 codes (coalesced weight and activation
//             loads), M x 2 float32 accumulators in registers (level space; y = acc * scale +
//             bias).  H200, 4-bit, M = 1: 1.45x faster than fp16 F.linear (goal: 2.5-3x).
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

#include "../lowbit_common.h"
#include "lowbit_gemv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace geta_lowbit {
namespace {

// The fused kernel serves M <= 4; taller x goes through dequantize + cuBLAS.  Measured on an
// H200 (benchmarks/README.md "Deploy"): at M = 8 the fused kernel took 43 us for 4096x4096 W4
// vs ~27 us for dequantize + cuBLAS; Nsight Compute showed it stalled on L1 (the activation
// loads, ~70% of stall cycles) with 0.8 waves of 95-register warps.  Candidate configurations
// (one row per warp, split-K, hoisted loads) are swept by benchmarks/cuda_lab/gemv_lab.cu.
constexpr int kMaxFusedM = 4;

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

// c10 dtype -> the CUDA type the device code uses (same layout).
template <typename T>
struct Cuda {
  using type = T;
};
template <>
struct Cuda<c10::Half> {
  using type = __half;
};
template <>
struct Cuda<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t, int BITS, int M>
void launch_gemv_tile(int m, const scalar_t* xp, const uint8_t* pp, const float* sp,
                      const scalar_t* bias, scalar_t* op, int64_t n, int64_t k, int64_t row_len,
                      int offset, bool aligned, bool x_vec, cudaStream_t stream) {
  // The configuration measured on the H200 (two rows per warp share each activation load, one
  // warp per block, UNROLL groups x 2 rows of loads in flight); other configurations of the
  // same kernel are compared by benchmarks/cuda_lab/gemv_lab.cu.
  constexpr int R = 2, KW = 1;
  constexpr int UNROLL = M <= 2 ? 8 : 4;
  using T = typename Cuda<scalar_t>::type;
  geta_gemv::gemv_kernel<T, BITS, M, R, KW, UNROLL, false>
      <<<geta_gemv::gemv_grid<R, KW>(n), KW * 32, 0, stream>>>(
          reinterpret_cast<const T*>(xp), pp, sp, reinterpret_cast<const T*>(bias),
          reinterpret_cast<T*>(op), m, n, k, row_len, offset, aligned, x_vec);
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
  const std::pair<int64_t, int64_t> nk = check_unpack_args(who, packed, scale, bits, shape, dtype);
  const int64_t n = nk.first, k = nk.second;
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor p = packed.contiguous();
  unpack_into(p, scale, out, n, k, bits, is_signed);
  return out;
}

at::Tensor lowbit_linear_cuda(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, int64_t bits, int64_t in_features,
                              bool is_signed, const c10::optional<at::Tensor>& bias) {
  const char* who = "geta::lowbit_linear";
  check_linear_args(who, x, packed, scale, bits, in_features, bias);
  const int64_t n = packed.size(0), k = in_features;
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
}  // namespace geta_lowbit

TORCH_LIBRARY_IMPL(geta, CUDA, m) {
  m.impl("lowbit_linear", &geta_lowbit::lowbit_linear_cuda);
  m.impl("unpack_weight", &geta_lowbit::unpack_weight_cuda);
}
