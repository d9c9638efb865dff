// Python bindings of specdec's CPU kernels (one extension module, built by kernels/cpu_quant.py).
#include <torch/extension.h>

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slots, const at::Tensor& mask, double scale);
at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& in_norm,
                         const at::Tensor& qkv_w, const at::Tensor& qkv_s, const at::Tensor& o_w,
                         const at::Tensor& o_s, const at::Tensor& post_norm, const at::Tensor& gu_w,
                         const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s,
                         double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                         double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8_linear", &w8_linear, "weight-only int8 linear (AVX2/FMA, float32 activations)");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight over the last dim (float32)");
  m.def("paged_attention", &paged_attention,
        "attention of a few queries over keys gathered from a paged pool (float32)");
  m.def("decoder_layer", &decoder_layer, "one dense Llama decoder layer over the paged cache (float32)");
}
