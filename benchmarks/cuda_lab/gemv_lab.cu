// Standalone sweep of the low-bit GEMV (geta_kernels/csrc/cuda/lowbit_gemv.cuh) configurations: no
// torch, one nvcc call, so a short GPU lease can compare many variants (issue #7's M <= 16
// goals).  For each K x N shape, M and configuration (R rows per block, KW warps per row
// splitting K, UNROLL groups in flight, HOIST activation loads; and a tensor-core candidate,
// gemv_mma_kernel below, 4-bit fp16 only, that is not in the extension yet):
//   * correctness: every output against a float64 CPU reference of the same levels and fp16
//     activations (|err| <= 2e-3 * sum |x w| + 1e-6, the tests' fp16 bound);
//   * GPU time per call: all calls captured in one CUDA graph and replayed between CUDA events,
//     each call on its own copy of the packed weight (copies totalling >= 384 MiB, so nothing is
//     L2-resident), next to cuBLAS fp16 GEMM (cublasGemmEx, fp32 accumulate) timed the same way.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -split-compile=0 -Igeta_kernels/csrc/cuda \
//        benchmarks/cuda_lab/gemv_lab.cu -lcublas -o /tmp/gemv_lab && /tmp/gemv_lab [--quick]
//
// Prints a markdown table.  The production launcher (launch_gemv_tile in lowbit_cuda.cu) uses
// the configuration named "prod" here.
#include "lowbit_gemv.cuh"

#include <cuda_runtime.h>

#include "lab_common.h"
#ifndef GEMV_LAB_NO_CUBLAS  // build without the cuBLAS baseline: -DGEMV_LAB_NO_CUBLAS
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifndef GEMV_LAB_NO_CUBLAS
#define CHECK_CUBLAS(expr)                                                                    \
  do {                                                                                        \
    cublasStatus_t s_ = (expr);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: cuBLAS status %d\n", __FILE__, __LINE__, #expr,        \
                   static_cast<int>(s_));                                                     \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)
#endif

namespace {

constexpr int kBits = 4;
constexpr int kOffset = 1 << (kBits - 1);  // signed levels: code - 8
constexpr size_t kRotateBytes = size_t{384} << 20;

struct Args {
  const __half* x;
  const uint8_t* packed;
  const float* scale;
  __half* out;
  int m;
  int64_t n, k, row_len;
};

using Launch = void (*)(const Args&, cudaStream_t);

template <int M, int R, int KW, int UNROLL, bool HOIST>
void launch(const Args& a, cudaStream_t stream) {
  geta_gemv::gemv_kernel<__half, kBits, M, R, KW, UNROLL, HOIST>
      <<<geta_gemv::gemv_grid<R, KW>(a.n), KW * 32, 0, stream>>>(
          a.x, a.packed, a.scale, nullptr, a.out, a.m, a.n, a.k, a.row_len, kOffset, true, true);
}

// One configuration: a launcher per M tile (1, 2, 4, 8, 16).
struct Config {
  const char* name;
  Launch by_tile[5];
};

#define TILES(R, KW, U, H) \
  { launch<1, R, KW, U, H>, launch<2, R, KW, U, H>, launch<4, R, KW, U, H>, \
    launch<8, R, KW, U, H>, launch<16, R, KW, U, H> }

// ---- tensor-core candidate (4-bit, fp16 activations, K % 64 == 0): mma.sync m16n8k16 ----
// A block owns 16 weight rows; its KSPLIT warps split K in spans of 64 codes (32 bytes per
// row).  Lane (g = lane / 4, t = lane % 4) needs, per 16-code tile i of a span, byte t of words
// 2i and 2i+1 of rows g and g+8 (the m16n8k16 A fragment of the row-major weight tile): it loads
// the rows' 32-byte spans (the 4 lanes of a group read the same bytes: an L1 broadcast) and
// turns each byte's two nibbles into an exact fp16 pair (0x6400 | nibble = 1024 + code, minus
// 1024 + 8).  B = x^T: column n = g is activation row nt*8 + g (zero past m_rows).  fp32
// accumulators; the KSPLIT partial tiles are summed through shared memory in warp order.
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int t) {
  const uint32_t b = (word >> (8 * t)) & 0xFFu;
  const uint32_t h = (b & 0xFu) | ((b & 0xF0u) << 12) | 0x64006400u;
  __half2 v;
  std::memcpy(&v, &h, 4);
  v = __hsub2(v, __float2half2_rn(1024.f + kOffset));
  uint32_t out;
  std::memcpy(&out, &v, 4);
  return out;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int NT, int KSPLIT, int SU>
__global__ void __launch_bounds__(KSPLIT * 32)
    gemv_mma_kernel(const __half* __restrict__ x, const uint8_t* __restrict__ packed,
                    const float* __restrict__ scale, __half* __restrict__ out, int m_rows,
                    int64_t n, int64_t k, int64_t row_len) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * 16;
  const uint8_t* row_lo = packed + min(r0 + g, n - 1) * row_len;
  const uint8_t* row_hi = packed + min(r0 + g + 8, n - 1) * row_len;
  const int64_t spans = k / 64;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[nt][j] = 0.f;
  for (int64_t s0 = warp; s0 < spans; s0 += KSPLIT * SU) {
    uint4 lo[SU][2], hi[SU][2];
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int64_t sp = s0 + static_cast<int64_t>(KSPLIT) * u;
      if (sp < spans) {
        lo[u][0] = __ldg(reinterpret_cast<const uint4*>(row_lo + sp * 32));
        lo[u][1] = __ldg(reinterpret_cast<const uint4*>(row_lo + sp * 32 + 16));
        hi[u][0] = __ldg(reinterpret_cast<const uint4*>(row_hi + sp * 32));
        hi[u][1] = __ldg(reinterpret_cast<const uint4*>(row_hi + sp * 32 + 16));
      }
    }
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int64_t sp = s0 + static_cast<int64_t>(KSPLIT) * u;
      if (sp >= spans) break;
      const uint32_t wl[8] = {lo[u][0].x, lo[u][0].y, lo[u][0].z, lo[u][0].w,
                              lo[u][1].x, lo[u][1].y, lo[u][1].z, lo[u][1].w};
      const uint32_t wh[8] = {hi[u][0].x, hi[u][0].y, hi[u][0].z, hi[u][0].w,
                              hi[u][1].x, hi[u][1].y, hi[u][1].z, hi[u][1].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t a[4] = {dequant_pair(wl[2 * i], t), dequant_pair(wh[2 * i], t),
                               dequant_pair(wl[2 * i + 1], t), dequant_pair(wh[2 * i + 1], t)};
        const int64_t kk = sp * 64 + 16 * i + 2 * t;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int m = nt * 8 + g;
          uint32_t b[2] = {0u, 0u};
          if (m < m_rows) {
            b[0] = __ldg(reinterpret_cast<const uint32_t*>(x + m * k + kk));
            b[1] = __ldg(reinterpret_cast<const uint32_t*>(x + m * k + kk + 8));
          }
          mma16816(acc[nt], a, b);
        }
      }
    }
  }
  if constexpr (KSPLIT > 1) {
    __shared__ float part[KSPLIT][NT][4][32];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[warp][nt][j][lane] = acc[nt][j];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float v = part[0][nt][j][lane];
        for (int w = 1; w < KSPLIT; ++w) v += part[w][nt][j][lane];
        acc[nt][j] = v;
      }
  }
  const float s = __ldg(scale);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + g + (j >= 2 ? 8 : 0);
      const int m = nt * 8 + 2 * t + (j & 1);
      if (m < m_rows && r < n) out[m * n + r] = __float2half_rn(acc[nt][j] * s);
    }
}

template <int NT, int KSPLIT, int SU>
void launch_mma(const Args& a, cudaStream_t stream) {
  if (a.k % 64 != 0) {
    std::fprintf(stderr, "gemv_mma_kernel needs K %% 64 == 0\n");
    std::exit(1);
  }
  gemv_mma_kernel<NT, KSPLIT, SU><<<static_cast<unsigned>((a.n + 15) / 16), KSPLIT * 32, 0,
                                    stream>>>(a.x, a.packed, a.scale, a.out, a.m, a.n, a.k,
                                              a.row_len);
}

#define MMA_TILES(KS, SU) \
  { launch_mma<1, KS, SU>, launch_mma<1, KS, SU>, launch_mma<1, KS, SU>, \
    launch_mma<1, KS, SU>, launch_mma<2, KS, SU> }

// "prod": the production launcher's choice (R = 2, one warp, UNROLL 8 for M <= 2 else 4).
const Config kConfigs[] = {
    {"prod R2 KW1", {launch<1, 2, 1, 8, false>, launch<2, 2, 1, 8, false>,
                     launch<4, 2, 1, 4, false>, launch<8, 2, 1, 4, false>,
                     launch<16, 2, 1, 4, false>}},
    {"R1 KW1 U16 H", TILES(1, 1, 16, true)},
    {"R2 KW1 U8 H", TILES(2, 1, 8, true)},
    {"R1 KW4 U4 H", TILES(1, 4, 4, true)},
    {"R2 KW4 U4 H", TILES(2, 4, 4, true)},
    {"R4 KW4 U2 H", TILES(4, 4, 2, true)},
    {"R2 KW2 U4 H", TILES(2, 2, 4, true)},
    {"R4 KW2 U4 H", TILES(4, 2, 4, true)},
    {"mma KS8 SU2", MMA_TILES(8, 2)},
    {"mma KS16 SU1", MMA_TILES(16, 1)},
    {"mma KS16 SU2", MMA_TILES(16, 2)},
    {"mma KS4 SU4", MMA_TILES(4, 4)},
};

int tile_index(int m) { return m <= 1 ? 0 : m <= 2 ? 1 : m <= 4 ? 2 : m <= 8 ? 3 : 4; }

// Packs signed levels (row-major [n, k], k % 8 == 0) into the geta bitstream layout.
std::vector<uint8_t> pack(const std::vector<int>& levels, int64_t n, int64_t k) {
  const int64_t row_len = k / 8 * kBits;
  std::vector<uint8_t> out(static_cast<size_t>(n * row_len), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t code = static_cast<uint32_t>(levels[r * k + j] + kOffset);
      const int64_t bit = j * kBits;
      out[r * row_len + bit / 8] |= static_cast<uint8_t>(code << (bit % 8));  // 4 | 8: no straddle
    }
  return out;
}

// GPU ms per call of `calls` (one per weight copy): captured once, replayed.
template <typename F>
float graph_ms(int calls, cudaStream_t stream, F&& issue) {
  for (int i = 0; i < calls; ++i) issue(i);  // warm-up (cuBLAS workspace, module load)
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) issue(i);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaEventRecord(start, stream));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaEventRecord(stop, stream));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float once = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&once, start, stop));
  const int reps = std::max(1, static_cast<int>(2.0f / std::max(once, 1e-3f)));
  float best = 1e30f;
  for (int round = 0; round < 5; ++round) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (int r = 0; r < reps; ++r) CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    best = std::min(best, ms / static_cast<float>(reps * calls));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("# gemv_lab: %s, %d SMs, L2 %d MB, CUDA runtime %d\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, CUDART_VERSION);
  std::printf("# W%d signed, fp16 activations; ms per call (CUDA-graph replay, weights rotated "
              "over >= %zu MiB); ratio = cuBLAS fp16 ms / this ms\n\n", kBits, kRotateBytes >> 20);
  std::printf("| K x N | M | config | ms | vs cuBLAS fp16 | max err / bound |\n");
  std::printf("|---|---|---|---|---|---|\n");
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
#ifndef GEMV_LAB_NO_CUBLAS
  cublasHandle_t blas;
  CHECK_CUBLAS(cublasCreate(&blas));
  CHECK_CUBLAS(cublasSetStream(blas, stream));
#endif
  std::mt19937 rng(0);
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      quick ? std::vector<std::pair<int64_t, int64_t>>{{4096, 4096}}
            : std::vector<std::pair<int64_t, int64_t>>{{4096, 4096}, {4096, 14336}};
  const std::vector<int> ms = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 2, 4, 8, 16};
  for (const auto& [k, n] : shapes) {
    const int64_t row_len = k / 8 * kBits;
    std::uniform_int_distribution<int> lv(-(kOffset - 1), kOffset - 1);
    std::vector<int> levels(static_cast<size_t>(n * k));
    for (auto& v : levels) v = lv(rng);
    const std::vector<uint8_t> packed = pack(levels, n, k);
    const float scale = 0.01f;
    const size_t wbytes = packed.size();
    const int copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + wbytes - 1) / wbytes));
    uint8_t* d_packed = nullptr;
    CHECK_CUDA(cudaMalloc(&d_packed, wbytes * copies));
    for (int c = 0; c < copies; ++c)
      CHECK_CUDA(cudaMemcpy(d_packed + c * wbytes, packed.data(), wbytes, cudaMemcpyHostToDevice));
    // fp16 dense weights (level * scale, exact in fp16) for cuBLAS, rotated the same way
    std::vector<__half> w16(static_cast<size_t>(n * k));
    for (size_t i = 0; i < w16.size(); ++i) w16[i] = __float2half(levels[i] * scale);
    const size_t w16bytes = w16.size() * sizeof(__half);
    const int copies16 =
        static_cast<int>(std::max<size_t>(2, (kRotateBytes + w16bytes - 1) / w16bytes));
    __half* d_w16 = nullptr;
    CHECK_CUDA(cudaMalloc(&d_w16, w16bytes * copies16));
    for (int c = 0; c < copies16; ++c)
      CHECK_CUDA(cudaMemcpy(d_w16 + c * w16.size(), w16.data(), w16bytes, cudaMemcpyHostToDevice));
    float* d_scale = nullptr;
    CHECK_CUDA(cudaMalloc(&d_scale, sizeof(float)));
    CHECK_CUDA(cudaMemcpy(d_scale, &scale, sizeof(float), cudaMemcpyHostToDevice));
    for (int m : ms) {
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<__half> x(static_cast<size_t>(m * k));
      for (auto& v : x) v = __float2half(nd(rng));
      // float64 reference and the error bound's magnitude term
      std::vector<double> ref(static_cast<size_t>(m * n)), mag(static_cast<size_t>(m * n));
      for (int i = 0; i < m; ++i)
        for (int64_t r = 0; r < n; ++r) {
          double s = 0, a = 0;
          const int* wl = &levels[r * k];
          const __half* xr = &x[i * k];
          for (int64_t j = 0; j < k; ++j) {
            const double xv = __half2float(xr[j]);
            s += xv * wl[j];
            a += std::fabs(xv * wl[j]);
          }
          ref[i * n + r] = s * scale;
          mag[i * n + r] = a * scale;
        }
      __half *d_x = nullptr, *d_out = nullptr;
      CHECK_CUDA(cudaMalloc(&d_x, x.size() * sizeof(__half)));
      CHECK_CUDA(cudaMalloc(&d_out, static_cast<size_t>(m * n) * sizeof(__half)));
      CHECK_CUDA(cudaMemcpy(d_x, x.data(), x.size() * sizeof(__half), cudaMemcpyHostToDevice));
#ifndef GEMV_LAB_NO_CUBLAS
      const float alpha = 1.f, beta = 0.f;
      const float t_blas = graph_ms(copies16, stream, [&](int c) {
        CHECK_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), m,
                                  static_cast<int>(k), &alpha, d_w16 + c * w16.size(), CUDA_R_16F,
                                  static_cast<int>(k), d_x, CUDA_R_16F, static_cast<int>(k),
                                  &beta, d_out, CUDA_R_16F, static_cast<int>(n),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      });
      std::printf("| %ldx%ld | %d | cuBLAS fp16 | %.4f | 1.00x | |\n", static_cast<long>(k),
                  static_cast<long>(n), m, t_blas);
#else
      const float t_blas = std::nanf("");  // no baseline in this build
#endif
      for (const Config& cfg : kConfigs) {
        const Launch fn = cfg.by_tile[tile_index(m)];
        Args a{d_x, d_packed, d_scale, d_out, m, n, k, row_len};
        CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, static_cast<size_t>(m * n) * sizeof(__half),
                                   stream));  // NaN: an unwritten output fails the check
        fn(a, stream);
        CHECK_CUDA(cudaGetLastError());
        std::vector<__half> got(static_cast<size_t>(m * n));
        CHECK_CUDA(cudaMemcpyAsync(got.data(), d_out, got.size() * sizeof(__half),
                                   cudaMemcpyDeviceToHost, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
        double worst = 0;  // max over outputs of |err| / bound (<= 1 passes)
        for (size_t i = 0; i < got.size(); ++i) {
          const double err = std::fabs(static_cast<double>(__half2float(got[i])) - ref[i]);
          const double bound = 2e-3 * mag[i] + 1e-6;
          worst = std::max(worst, std::isfinite(err) ? err / bound : 1e30);
        }
        const float t = graph_ms(copies, stream, [&](int c) {
          Args ac = a;
          ac.packed = d_packed + c * wbytes;
          fn(ac, stream);
        });
        std::printf("| %ldx%ld | %d | %s | %.4f | %.2fx | %.3f%s |\n", static_cast<long>(k),
                    static_cast<long>(n), m, cfg.name, t, t_blas / t, worst,
                    worst <= 1.0 ? "" : " FAIL");
        std::fflush(stdout);
      }
      CHECK_CUDA(cudaFree(d_x));
      CHECK_CUDA(cudaFree(d_out));
    }
    CHECK_CUDA(cudaFree(d_packed));
    CHECK_CUDA(cudaFree(d_w16));
    CHECK_CUDA(cudaFree(d_scale));
  }
#ifndef GEMV_LAB_NO_CUBLAS
  CHECK_CUBLAS(cublasDestroy(blas));
#endif
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
