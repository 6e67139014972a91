// Shared host-side helpers for the fused geta::quantize / geta::quantize_backward kernels.
//
// Included by geta_kernels/csrc/cpu/quantize_cpu.cpp (g++) and geta_kernels/csrc/cuda/quantize_cuda.cu
// (nvcc).  The op schemas live in geta_fx/ops/schema.py; the semantics (the contract) in
// geta_fx/ops/reference.py.  Nothing here registers anything.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace geta_kernels {
// Internal linkage: the CPU and the CUDA library each include this header, and torch loads
// custom-op libraries with RTLD_GLOBAL; no helper may resolve to the other library's copy.
namespace {

// Error messages pass only strings (const char*, std::string) to TORCH_CHECK, never numbers or
// c10 objects through an ostream: some toolchains (seen: the GPU machines' /opt/gcc) link
// libstdc++ statically into the extension, and that copy's numeric ostream facets crash when
// used next to the process's shared libstdc++ (a segfault in ostream::_M_insert<long>).
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline bool is_supported_x_dtype(c10::ScalarType s) {
  return s == c10::ScalarType::Float || s == c10::ScalarType::Half ||
         s == c10::ScalarType::BFloat16;
}

// Same conditions, same wording as geta_fx.ops.reference.check_quantize_inputs.
inline void check_quantize_inputs(const char* op, const at::Tensor& x, const at::Tensor& d,
                                  const at::Tensor& q_m, const at::Tensor& t) {
  TORCH_CHECK(is_supported_x_dtype(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", c10::toString(x.scalar_type()));
  const char* names[3] = {"d", "q_m", "t"};
  const at::Tensor* params[3] = {&d, &q_m, &t};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& p = *params[i];
    TORCH_CHECK(p.numel() == 1, op, ": ", names[i], " must have exactly one element, got shape ",
                shape_str(p.sizes()));
    TORCH_CHECK(p.scalar_type() == c10::ScalarType::Float, op, ": ", names[i],
                " must be float32, got ",
                c10::toString(p.scalar_type()));
    TORCH_CHECK(p.device() == x.device(), op, ": ", names[i], " is on ", p.device().str(),
                " but x is on ", x.device().str());
  }
}

inline void check_quantize_backward_inputs(const char* op, const at::Tensor& grad_y,
                                           const at::Tensor& x, const at::Tensor& d,
                                           const at::Tensor& q_m, const at::Tensor& t) {
  check_quantize_inputs(op, x, d, q_m, t);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ",
              c10::toString(grad_y.scalar_type()), " != x dtype ", c10::toString(x.scalar_type()));
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device().str(),
              ", x on ", x.device().str());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y shape ", shape_str(grad_y.sizes()),
              " != x shape ", shape_str(x.sizes()));
}

// Returns `src` if it already has exactly the layout of `like` (an output made by
// at::empty_like(x), hence non-overlapping and dense), else a copy of `src` in that layout.
// Afterwards every tensor of a call shares one dense layout, so the kernels walk
// [data_ptr, data_ptr + numel) linearly: element i of x, grad_y, y and grad_x is the same
// logical element.  Inputs that are already dense with the output's strides (contiguous,
// channels-last, transposed, ...) are used in place; only irregular views (slices with
// steps, expanded grad_y, ...) pay one extra copy.
inline at::Tensor in_layout_of(const at::Tensor& src, const at::Tensor& like) {
  if (src.strides() == like.strides() && src.is_non_overlapping_and_dense()) {
    return src;
  }
  at::Tensor out = at::empty_like(like, src.options());
  out.copy_(src);
  return out;
}

}  // namespace
}  // namespace geta_kernels
