// Python bindings of specdec's CPU kernels (one extension module, built by kernels/cpu_kernels.py).
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8_linear", &w8_linear, "weight-only int8 linear (AVX2/FMA, float32 activations)");
  m.def("w4_linear", &w4_linear, "weight-only int4 linear, Q4_1-style groups of 32 (AVX2/F16C, float32 activations)");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight over the last dim (float32)");
  m.def("paged_attention", &paged_attention,
        "attention of a few queries over keys gathered from a paged pool (float32)");
  m.def("decoder_layer", &decoder_layer, "one dense Llama decoder layer over the paged cache (float32)");
  m.def("decoder_stack", &decoder_stack, "every layer of a dense Llama in one call (float32), with captures");
  m.def("eagle3_layer", &eagle3_layer, "the EAGLE3 draft head's decoder layer over the paged cache (float32)");
}
