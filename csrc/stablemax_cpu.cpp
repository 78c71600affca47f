// Multithreaded CPU kernels for StableMax / log-StableMax over rows of a [rows, cols] float32
// view (unit column stride). Registered as stablecore_C::stablemax_fwd / stablemax_bwd and used
// by stablecore/ops/stablemax.py as the "cpu" backend when the extension is built.
//
// Same numerics as the Triton kernels (kernels/stablemax.py): the row sum is taken relative to
// the row maximum of s(x) so that huge logits cannot overflow it, accumulated in double.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace stablecore_C {
namespace {

inline float s_of(float x) { return x >= 0.f ? x + 1.f : 1.f / (1.f + std::fabs(x)); }
inline float g_of(float x) {
  const float l = std::log1p(std::fabs(x));
  return x >= 0.f ? l : -l;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be [rows, cols], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " needs a unit column stride");
}

// Rows per task: enough work per thread to amortise the scheduling.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> stablemax_fwd(const at::Tensor& x, bool log) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1), xs = x.stride(0);
  at::Tensor out = at::empty({rows, cols}, x.options());
  at::Tensor log_norm = at::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = log_norm.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * xs;
      float* orow = op + r * cols;
      float row_max = 0.f;
      for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, s_of(xr[c]));
      double total = 0.0;
      const float inv_max = 1.f / row_max;
      for (int64_t c = 0; c < cols; ++c) total += static_cast<double>(s_of(xr[c]) * inv_max);
      const float ln = std::log(row_max) + static_cast<float>(std::log(total));
      lp[r] = ln;
      const float inv_total = static_cast<float>(1.0 / total);
      for (int64_t c = 0; c < cols; ++c) {
        orow[c] = log ? g_of(xr[c]) - ln : s_of(xr[c]) * inv_max * inv_total;
      }
    }
  });
  return {out, log_norm};
}

at::Tensor stablemax_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& log_norm,
                         bool log) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad shape ", grad.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(log_norm.is_contiguous() && log_norm.numel() == x.size(0) &&
                  log_norm.scalar_type() == at::kFloat,
              "log_norm must be a contiguous float32 [rows] tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor grad_x = at::empty({rows, cols}, x.options());
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float* lp = log_norm.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  const int64_t gs = grad.stride(0), xs = x.stride(0);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *gr = gp + r * gs, *xr = xp + r * xs;
      float* out = gxp + r * cols;
      double dot = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        dot += log ? gr[c] : gr[c] * std::exp(g_of(xr[c]) - lp[r]);
      }
      const float d = static_cast<float>(dot);
      for (int64_t c = 0; c < cols; ++c) {
        const float p = std::exp(g_of(xr[c]) - lp[r]);
        const float gz = log ? gr[c] - p * d : p * (gr[c] - d);
        out[c] = gz / (1.f + std::fabs(xr[c]));
      }
    }
  });
  return grad_x;
}

}  // namespace stablecore_C

TORCH_LIBRARY(stablecore_C, m) {
  m.def("stablemax_fwd(Tensor x, bool log) -> (Tensor, Tensor)");
  m.def("stablemax_bwd(Tensor grad, Tensor x, Tensor log_norm, bool log) -> Tensor");
}

TORCH_LIBRARY_IMPL(stablecore_C, CPU, m) {
  m.impl("stablemax_fwd", &stablecore_C::stablemax_fwd);
  m.impl("stablemax_bwd", &stablecore_C::stablemax_bwd);
}

// An importable module, so that `import stablecore._C` loads the library and runs the
// registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "stablecore native kernels (ops live in torch.ops.stablecore_C)";
}
