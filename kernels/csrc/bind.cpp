// Python bindings of specdec's CPU kernels (one extension module, built by kernels/cpu_quant.py).
#include <torch/extension.h>

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slots, const at::Tensor& mask, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8_linear", &w8_linear, "weight-only int8 linear (AVX2/FMA, float32 activations)");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight over the last dim (float32)");
  m.def("paged_attention", &paged_attention,
        "attention of a few queries over keys gathered from a paged pool (float32)");
}
