// CPU kernel of geta::quantize.table: an activation quantizer's levels read from a threshold
// table (two gathers per vector) instead of exp/log per element.
//
// Schema: geta_fx/ops/schema.py.  Contract and reference: geta_fx/ops/quantize_table.py (the
// oracle; this kernel agrees with it bit for bit).  One pass over x in float32: AVX-512 (16
// lanes, masked tail) or AVX2 (8 lanes, scalar tail) intrinsics in the libraries compiled for
// those capabilities, the scalar element function of quantize_table_common.h elsewhere.
// float16/bfloat16 inputs are converted to float32 first and the result back (round to
// nearest even), as the reference does.

#include "../quantize_table_span.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace geta_kernels {
namespace {

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
  const TableArgs tab = table_args(d, q_m, scale, bounds, base);
  const Table& k = tab.k;
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
