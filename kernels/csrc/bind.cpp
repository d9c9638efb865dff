// Python bindings of specdec's CPU kernels (one extension module, built by kernels/cpu_kernels.py).
#include <torch/extension.h>

#include "cpu_kernels.h"

#if defined(SPECDEC_ISA_AMX)
#include <sys/syscall.h>
#include <unistd.h>

// Linux hands out AMX tile data per process on request; the first tile instruction without it
// is SIGILL. Asked at import, so the module never loads where it would crash.
static bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(SPECDEC_ISA_AMX)
  if (!request_amx_permission()) throw pybind11::import_error("specdec amx kernels: Linux refused AMX tile data");
#endif
  m.def("w8_linear", &w8_linear, "weight-only int8 linear (AVX2/FMA, float32 activations)");
  m.def("w4_linear", &w4_linear, "weight-only int4 linear, Q4_1-style groups of 32 (AVX2/F16C, float32 activations)");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight over the last dim (float32)");
  m.def("paged_attention", &paged_attention,
        "attention of a few queries over keys gathered from a paged pool (float32)");
  m.def("paged_attention_batch", &paged_attention_batch,
        "a decode batch: one float32 query per request over that request's slots");
  m.def("paged_attention_seqs", &paged_attention_seqs,
        "several requests packed row after row, each over its own slots and mask (float32)");
  m.def("top_logprobs", &top_logprobs, "the k best log-probabilities of each row of float32 logits, best first");
  m.def("argmax_rows", &argmax_rows, "the index of each row's largest float32 value (torch.argmax's ties and NaN)");
  m.def("truncated_probs", &truncated_probs,
        "softmax of scaled logits cut by top-k, top-p and min-p, renormalised (no sort of the row)");
  m.def("race_rows", &race_rows, "one exponential race per row of float32 weights, E from the row's int64 seed");
  m.def("decoder_layer", &decoder_layer, "one dense Llama decoder layer over the paged cache (float32)");
  m.def("decoder_layer_attention", &decoder_layer_attention,
        "a decoder layer's attention half without the residual (--tp: this rank's partial sum)");
  m.def("decoder_layer_mlp", &decoder_layer_mlp,
        "a decoder layer's MLP half without the residual (--tp: this rank's partial sum)");
  m.def("decoder_stack", &decoder_stack, "every layer of a dense Llama in one call (float32), with captures");
  m.def("decoder_stack_seqs", &decoder_stack_seqs,
        "decoder_stack over several requests packed row after row (a batch of decodes or trees)");
  m.def("eagle3_layer", &eagle3_layer, "the EAGLE3 draft head's decoder layer over the paged cache (float32)");
  m.def("eagle3_layer_seqs", &eagle3_layer_seqs, "eagle3_layer over several requests packed row after row");
}
