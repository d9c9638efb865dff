// Declarations of specdec's CPU kernels (one extension; see kernels/cpu_kernels.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

// The integer linear kernels take x float32 [M, K]; their packed weights are Kp = padded_k(K)
// wide (zero columns up to a multiple of 64). Activations are quantised to int16 per block of k:
// w8 blocks of act_block(Kp) (the largest of 256, 192, 128, 64 dividing Kp: int32 block sums of
// int16 x int8 products cannot overflow, and fewer blocks mean fewer int -> float steps), w4
// blocks of 32 (its weight groups).
constexpr int64_t kAlign = 64;
constexpr int64_t kW4Group = 32;
inline int64_t padded_k(int64_t K) { return (K + kAlign - 1) / kAlign * kAlign; }
// int8 codes (act_bits 8) take blocks of 64 whatever Kp: 258x coarser codes need the finer blocks
// (bench/quant_accuracy, mean |dlogprob| of the bundled model: 0.061 with blocks of 192-256, 0.044 with 64)
inline int64_t act_block(int64_t Kp, int64_t act_bits = 16) {
  if (act_bits == 8) return kAlign;
  for (int64_t b : {256, 192, 128}) if (Kp % b == 0) return b;
  return kAlign;
}

// quantise.cpp: one row of K floats (K % block == 0, block % 16 == 0) -> int16 codes
// q = rint(x * qmax / amax) with one scale s = amax / qmax per block (and, when `sums` is not
// null, the block's sum of codes); quantise_rows does M rows of x [M, K] into q [M, Kp],
// s [M, Kp / block], the tail of a row with K < Kp quantised as if padded with zeros.
// qmax = act_qmax(act_bits): 32767 (int16 codes, w8a16 / w4a16) or 127 (int8 codes, w8a8_int8)
inline float act_qmax(int64_t act_bits) { return act_bits == 8 ? 127.0f : 32767.0f; }
void quantise_row(const float* x, int64_t K, int64_t block, int16_t* q, float* s, int32_t* sums,
                  float qmax = 32767.0f);
void quantise_rows(const float* x, int64_t M, int64_t K, int64_t block, int16_t* q, float* s, int32_t* sums,
                   float qmax = 32767.0f);

// quantise.cpp: the int8 kernel's input checks (either tier's layout, `tile` channels per tile)
struct W8Shape {
  int64_t M, Kp, N;
  bool has_bias;
};
W8Shape check_w8_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias,
                      int64_t tile, int64_t act_bits);

// w8_linear*.cpp: y = x (w * scale)^T + bias; x float32 [M, K], w int8 [N_t, Kp] in the tier's
// pack_w8 layout (N_t = N rounded up to the tier's tile of channels); act_bits 16 (w8a16: int16
// activation codes) or 8 (w8a8_int8: int8 codes, one VNNI product per 4 k on avx512/amx)
at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& bias, int64_t act_bits);

// quantise.cpp: the int4 kernel's input checks (either tier's layout, `tile` channels per tile);
// returns {M, Kp, N, has_bias}
W8Shape check_w4_args(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t N,
                      const at::Tensor& bias, int64_t tile);

// w4_linear*.cpp: y = x w^T + bias with w[n, k] = scale[n, g] * q[n, k] + low[n, g] (g = k / 32,
// q in 0..15); wq uint8 [N_t, Kp/2] and ws float16 [N_t/t, Kp/32, 2, t] in the tier's pack_w4
// layout (t = 8 channels per tile on avx2, 16 on avx512/amx; N_t = N rounded up to t)
at::Tensor w4_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t N,
                     const at::Tensor& bias);

// cpu_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slots, const at::Tensor& mask, double scale);
// one query per request over its own slots (a decode batch)
at::Tensor paged_attention_batch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& index, const at::Tensor& lens, double scale);
// several requests packed row after row: request b owns rows starts[b] .. starts[b + 1] and attends
// over slots[b] with masks[b] (empty: causal by index), each as paged_attention on its rows alone
at::Tensor paged_attention_seqs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots,
                                const std::vector<at::Tensor>& masks, double scale);

// top_logprobs.cpp: the k best log_softmax values of each row and their indices, best first
std::tuple<at::Tensor, at::Tensor> top_logprobs(const at::Tensor& logits, int64_t k);

// argmax_rows.cpp: the index of each row's largest value (ties: the smallest; NaN: the first NaN)
at::Tensor argmax_rows(const at::Tensor& logits);

// sampling.cpp: top-k / top-p / min-p truncation of temperature-scaled logits without a sort of the
// row, and exponential races
at::Tensor truncated_probs(const at::Tensor& scaled, const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& min_p);
// one exponential race per row (argmax p / E, E from splitmix64 of the row's seed and the index)
at::Tensor race_rows(const at::Tensor& probs, const at::Tensor& seeds);

// decoder_layer.cpp: one dense Llama layer over the paged cache
at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& in_norm,
                         const at::Tensor& qkv_w, const at::Tensor& qkv_s, const at::Tensor& o_w,
                         const at::Tensor& o_s, const at::Tensor& post_norm, const at::Tensor& gu_w,
                         const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s,
                         double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                         double scale, int64_t act_bits);
// the two halves of decoder_layer without its residual adds (--tp: each returns this rank's
// partial sum): attention = O(attention(QKV(rms_norm(x)))), K/V stored; mlp = down(silu(g) * u)
// of rms_norm(x, post_norm); decoder_layer(x) == h + mlp(h) with h = x + attention(x)
at::Tensor decoder_layer_attention(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& in_norm,
                                   const at::Tensor& qkv_w, const at::Tensor& qkv_s, const at::Tensor& o_w,
                                   const at::Tensor& o_s, double eps, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t head_dim, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                                   double scale, int64_t act_bits);
at::Tensor decoder_layer_mlp(const at::Tensor& x, const at::Tensor& post_norm, const at::Tensor& gu_w,
                             const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s, double eps,
                             int64_t act_bits);
// the EAGLE3 draft layer: attention input [rms_norm(emb, in_norm) | rms_norm(feat, hidden_norm)],
// residual feat; returns the pre-norm hidden [T, hidden]
at::Tensor eagle3_layer(const at::Tensor& emb, const at::Tensor& feat, const at::Tensor& rope,
                        const at::Tensor& in_norm, const at::Tensor& hidden_norm, const at::Tensor& qkv_w,
                        const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s,
                        const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                        const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& out_slots, const at::Tensor& kv_slots,
                        const at::Tensor& mask, double scale, int64_t act_bits);
// eagle3_layer over several requests packed row after row (paged_attention_seqs' starts, slots, masks)
at::Tensor eagle3_layer_seqs(const at::Tensor& emb, const at::Tensor& feat, const at::Tensor& rope,
                             const at::Tensor& in_norm, const at::Tensor& hidden_norm, const at::Tensor& qkv_w,
                             const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s,
                             const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                             const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& out_slots,
                             const std::vector<int64_t>& starts, const std::vector<at::Tensor>& kv_slots,
                             const std::vector<at::Tensor>& masks, double scale, int64_t act_bits);

// all layers of a dense Llama (10 weights per layer as decoder_layer takes them, in order) in
// one call (act_bits: as w8_linear's, for every int8 linear); returns {final hidden, the input of layer i for each i in capture (i == L: the
// final hidden)}
std::vector<at::Tensor> decoder_stack(const at::Tensor& x, const at::Tensor& rope, const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                                      double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                      const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                                      double scale, const std::vector<int64_t>& capture, int64_t act_bits);
// decoder_stack over several requests packed row after row (paged_attention_seqs' starts, slots,
// masks): a batch of decodes or trees in one call; each request's rows equal decoder_stack on it alone
std::vector<at::Tensor> decoder_stack_seqs(const at::Tensor& x, const at::Tensor& rope,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<at::Tensor>& k_caches,
                                           const std::vector<at::Tensor>& v_caches, double eps, int64_t num_heads,
                                           int64_t num_kv_heads, int64_t head_dim, const at::Tensor& out_slots,
                                           const std::vector<int64_t>& starts, const std::vector<at::Tensor>& kv_slots,
                                           const std::vector<at::Tensor>& masks, double scale,
                                           const std::vector<int64_t>& capture, int64_t act_bits);
