// Standalone sweep of the fused quantizer kernels' tuning knobs
// (geta_kernels/csrc/cuda/quantize_kernels.cuh: UNROLL, MATH, PACK) for issue #5's fp16/bf16 goals:
// no torch, one nvcc call.  For a 4096x4096 weight and an 8x2048x4096 activation, fp16 and
// bf16, linear (t = 1) and nonlinear (t = 1.5) quantizers (q_m = 3, d = q_m^t / 127, signed):
//   * correctness: every variant's forward output is bitwise equal to the production variant's
//     (UNROLL 2, MATH 0, PACK off), also on all 65,536 bit patterns of the dtype; backward
//     grad_x bitwise equal and the three sums within 1e-5 relative;
//   * ms and % of the copy floor (cudaMemcpyAsync device to device of the same bytes) for the
//     forward and forward+backward, best of 5 batches of 20 calls between CUDA events.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -split-compile=0 -Igeta_kernels/csrc/cuda \
//        benchmarks/cuda_lab/quant_lab.cu -o /tmp/quant_lab && /tmp/quant_lab
#include "quantize_kernels.cuh"

#include <cuda_runtime.h>

#include "lab_common.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>


using namespace geta_kernels;

namespace lab {

struct Dev {
  const float *d, *q, *t;
};

using Fwd = void (*)(const void* x, void* y, int64_t n, Dev p, int grid, cudaStream_t s);
using Bwd = void (*)(const void* gy, const void* x, void* gx, int64_t n, Dev p, float* parts,
                     int grid, cudaStream_t s);

template <typename T, int UNROLL, int MATH, bool PACK>
void fwd(const void* x, void* y, int64_t n, Dev p, int grid, cudaStream_t s) {
  constexpr int V = 16 / sizeof(T);
  quantize_forward_kernel<T, V, UNROLL, MATH, PACK><<<grid, kThreads, 0, s>>>(
      static_cast<const T*>(x), static_cast<T*>(y), n, p.d, p.q, p.t, true);
}

template <typename T, int UNROLL, int MATH>
void bwd(const void* gy, const void* x, void* gx, int64_t n, Dev p, float* parts, int grid,
         cudaStream_t s) {
  constexpr int V = 16 / sizeof(T);
  quantize_backward_kernel<T, V, UNROLL, MATH><<<grid, kThreads, 0, s>>>(
      static_cast<const T*>(gy), static_cast<const T*>(x), static_cast<T*>(gx), n, p.d, p.q, p.t,
      true, parts);
}

template <auto K>
int resident_grid(int sms) {
  int per_sm = 0;
  CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, K, kThreads, 0));
  return std::max(1, per_sm) * sms;
}

struct Variant {
  std::string name;
  Fwd f;
  Bwd b;
  int fgrid, bgrid;
};

template <typename T, int UNROLL, int MATH, bool PACK>
Variant make(const char* name, int sms) {
  constexpr int V = 16 / sizeof(T);
  return {name, fwd<T, UNROLL, MATH, PACK>, bwd<T, UNROLL, MATH>,
          resident_grid<quantize_forward_kernel<T, V, UNROLL, MATH, PACK>>(sms),
          resident_grid<quantize_backward_kernel<T, V, UNROLL, MATH>>(sms)};
}

template <typename T>
std::vector<Variant> variants(int sms) {
  return {make<T, 2, 0, false>("prod U2 M0", sms), make<T, 4, 0, false>("U4 M0", sms),
          make<T, 2, 1, false>("U2 M1", sms),      make<T, 4, 1, false>("U4 M1", sms),
          make<T, 2, 1, true>("U2 M1 pack", sms),  make<T, 4, 1, true>("U4 M1 pack", sms),
          make<T, 2, 2, true>("U2 M2 pack", sms),  make<T, 4, 2, true>("U4 M2 pack", sms)};
}

template <typename F>
float best_ms(cudaStream_t s, F&& call) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  call();
  float best = 1e30f;
  for (int round = 0; round < 5; ++round) {
    CHECK_CUDA(cudaEventRecord(a, s));
    for (int i = 0; i < 20; ++i) call();
    CHECK_CUDA(cudaEventRecord(b, s));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms / 20.f);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return best;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    const float fa = static_cast<float>(a[i]), fb = static_cast<float>(b[i]);
    if (std::isnan(fa) && std::isnan(fb)) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return false;
  }
  return true;
}

template <typename T>
void run(const char* dtype, int sms, cudaStream_t s, float* d_params, float* d_parts,
         float* d_out3, std::mt19937& rng) {
  const std::vector<std::pair<const char*, int64_t>> shapes = {{"4096x4096", 4096LL * 4096},
                                                               {"8x2048x4096", 8LL * 2048 * 4096}};
  std::vector<Variant> vs = variants<T>(sms);
  for (float t : {1.0f, 1.5f}) {
    const float q = 3.f, d = std::pow(q, t) / 127.f;
    const float hp[3] = {d, q, t};
    CHECK_CUDA(cudaMemcpy(d_params, hp, sizeof(hp), cudaMemcpyHostToDevice));
    const Dev p{d_params, d_params + 1, d_params + 2};
    for (const auto& shape_n : shapes) {
      const char* shape = shape_n.first;
      const int64_t n = shape_n.second;
      static std::map<int64_t, std::pair<std::vector<T>, std::vector<T>>> inputs;  // per shape
      auto& [hx, hg] = inputs[n];
      if (hx.empty()) {
        std::normal_distribution<float> nd(0.f, 1.2f);
        hx.resize(static_cast<size_t>(n));
        hg.resize(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          hx[i] = static_cast<T>(i % 7 == 0 ? 0.f : nd(rng));  // some exact zeros
          hg[i] = static_cast<T>(nd(rng));
        }
      }
      const size_t bytes = static_cast<size_t>(n) * sizeof(T);
      T *x, *g, *y, *gx, *copy;
      CHECK_CUDA(cudaMalloc(&x, bytes));
      CHECK_CUDA(cudaMalloc(&g, bytes));
      CHECK_CUDA(cudaMalloc(&y, bytes));
      CHECK_CUDA(cudaMalloc(&gx, bytes));
      CHECK_CUDA(cudaMalloc(&copy, bytes));
      CHECK_CUDA(cudaMemcpy(x, hx.data(), bytes, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(g, hg.data(), bytes, cudaMemcpyHostToDevice));
      const float t_copy = best_ms(s, [&] {
        CHECK_CUDA(cudaMemcpyAsync(copy, x, bytes, cudaMemcpyDeviceToDevice, s));
      });
      // forward+backward floor: the copy moves 2 tensor passes, fwd+bwd 5 (x; y | gy, x; gx)
      std::vector<T> ref_y, ref_gx;
      float ref_sums[3] = {0, 0, 0};
      for (const Variant& v : vs) {
        v.f(x, y, n, p, v.fgrid, s);
        v.b(g, x, gx, n, p, d_parts, v.bgrid, s);
        quantize_backward_finalize_kernel<<<1, kThreads, 0, s>>>(
            d_parts, v.bgrid, p.q, p.t, d_out3, d_out3 + 1, d_out3 + 2);
        CHECK_CUDA(cudaGetLastError());
        std::vector<T> hy(static_cast<size_t>(n)), hgx(static_cast<size_t>(n));
        float sums[3];
        CHECK_CUDA(cudaMemcpy(hy.data(), y, bytes, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(hgx.data(), gx, bytes, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(sums, d_out3, sizeof(sums), cudaMemcpyDeviceToHost));
        std::string verdict = "ok";
        if (ref_y.empty()) {
          ref_y = hy;
          ref_gx = hgx;
          std::memcpy(ref_sums, sums, sizeof(sums));
        } else {
          if (!same_bits(hy, ref_y)) verdict = "FAIL fwd";
          if (!same_bits(hgx, ref_gx)) verdict = "FAIL grad_x";
          for (int i = 0; i < 3; ++i)
            if (std::fabs(sums[i] - ref_sums[i]) > 1e-5f * std::fabs(ref_sums[i]) + 1e-6f)
              verdict = "FAIL sums";
        }
        const float tf = best_ms(s, [&] { v.f(x, y, n, p, v.fgrid, s); });
        const float tb = best_ms(s, [&] {
          v.f(x, y, n, p, v.fgrid, s);
          v.b(g, x, gx, n, p, d_parts, v.bgrid, s);
          quantize_backward_finalize_kernel<<<1, kThreads, 0, s>>>(
              d_parts, v.bgrid, p.q, p.t, d_out3, d_out3 + 1, d_out3 + 2);
        });
        std::printf("| %s | %s | %s | %s | %.4f | %.0f%% | %.4f | %.0f%% | %s |\n", shape, dtype,
                    t == 1.f ? "linear" : "nonlinear", v.name.c_str(), tf, 100.f * t_copy / tf,
                    tb, 100.f * (2.5f * t_copy) / tb, verdict.c_str());
        std::fflush(stdout);
      }
      CHECK_CUDA(cudaFree(x));
      CHECK_CUDA(cudaFree(g));
      CHECK_CUDA(cudaFree(y));
      CHECK_CUDA(cudaFree(gx));
      CHECK_CUDA(cudaFree(copy));
    }
    // every bit pattern of the dtype: forward bitwise equal across variants
    const int64_t n = 1 << 16;
    std::vector<T> hx(n);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t b = static_cast<uint16_t>(i);
      std::memcpy(&hx[i], &b, 2);
    }
    T *x, *y;
    CHECK_CUDA(cudaMalloc(&x, n * sizeof(T)));
    CHECK_CUDA(cudaMalloc(&y, n * sizeof(T)));
    CHECK_CUDA(cudaMemcpy(x, hx.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    std::vector<T> ref;
    int bad = 0;
    for (const Variant& v : vs) {
      v.f(x, y, n, p, v.fgrid, s);
      std::vector<T> hy(n);
      CHECK_CUDA(cudaMemcpy(hy.data(), y, n * sizeof(T), cudaMemcpyDeviceToHost));
      if (ref.empty()) {
        ref = hy;
      } else if (!same_bits(hy, ref)) {
        std::printf("# FAIL: %s %s t=%.1f differs on the all-bit-patterns input\n", dtype,
                    v.name.c_str(), t);
        ++bad;
      }
    }
    if (bad == 0)
      std::printf("# %s t=%.1f: all %zu variants agree bitwise on all 65536 bit patterns\n",
                  dtype, t, vs.size());
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
  }
}

}  // namespace lab

int main() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("# quant_lab: %s, %d SMs, CUDA runtime %d; %%copy = cudaMemcpy D2D ms (x 2.5 for "
              "fwd+bwd: 5 tensor passes vs 2) / variant ms\n\n",
              prop.name, prop.multiProcessorCount, CUDART_VERSION);
  std::printf("| shape | dtype | quantizer | variant | fwd ms | fwd %%copy | fwd+bwd ms | "
              "f+b %%copy | check |\n|---|---|---|---|---|---|---|---|---|\n");
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  float *d_params, *d_parts, *d_out3;
  CHECK_CUDA(cudaMalloc(&d_params, 3 * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_parts, 3 * sizeof(float) * 65536));
  CHECK_CUDA(cudaMalloc(&d_out3, 3 * sizeof(float)));
  std::mt19937 rng(0);
  lab::run<__half>("float16", prop.multiProcessorCount, s, d_params, d_parts, d_out3, rng);
  lab::run<__nv_bfloat16>("bfloat16", prop.multiProcessorCount, s, d_params, d_parts, d_out3,
                          rng);
  CHECK_CUDA(cudaStreamDestroy(s));
  return 0;
}
