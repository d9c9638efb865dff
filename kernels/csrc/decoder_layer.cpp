// One dense Llama decoder layer in a single call, float32, for the CPU hot path (decode and
// tree verification of one request, or of a batch of requests packed row after row: the
// `_seqs` forms, where only attention looks at which rows are whose); `decoder_layer_attention` and `decoder_layer_mlp` are its
// two halves without the residuals, for --tp (each rank's partial sums are all-reduced between
// them, in Python); `eagle3_layer` is the EAGLE3 draft head's layer (two
// norms over [embedding | features], the features as residual) on the same body. Python dispatches ~30 small torch ops per layer, which
// at batch 1 costs as much as the layer's arithmetic; here they are plain C++ calls.
// Reference: the module path (target/llama4.py DecoderLayer.forward with the torch
// backend), which the tests compare against.
//
//   h   = rms_norm(x) ; qkv = h W_qkv^T ; rope(q, k) on adjacent pairs ; store k, v at out_slots
//   x  += attention(q over kv_slots, mask) W_o^T
//   x  += (silu(g) * u) W_down^T  with [g | u] = rms_norm(x) W_gu^T
//
// Each linear is int8 (pack_w8 + float scale), int4 (pack_w4 + float16 scales) or float32
// (scale empty); act_bits is the int8 linears' activation codes (16: w8a16, 8: w8a8_int8).

#include "cpu_kernels.h"
#include "simd.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// which packed rows are whose: request b owns rows starts[b] .. starts[b + 1], attends over
// slots[b] with masks[b] (empty: causal by index); paged_attention_seqs' arguments
struct Seqs {
  std::vector<int64_t> starts;
  std::vector<at::Tensor> slots, masks;
};

Seqs one_seq(int64_t T, const at::Tensor& kv_slots, const at::Tensor& mask) { return {{0, T}, {kv_slots}, {mask}}; }

// w: int8 (pack_w8, scale float32 [N]), uint8 (pack_w4, scale = its float16 scales, N = rows)
// or float32 (scale empty)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t act_bits) {
  if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(act_bits == 16, "decoder_layer: int4 weights take int16 activation codes (act_bits 16)");
    return w4_linear(x, w, scale, w.size(0), x.new_empty({0}));
  }
  if (scale.numel() > 0) return w8_linear(x, w, scale, x.new_empty({0}), act_bits);
  return at::linear(x, w);
}

// x [T, heads, D] contiguous, in place; rope [T, D/2, 2] = (cos, sin) per position and pair
void rope_inplace(float* x, int64_t T, int64_t heads, int64_t D, const float* rope) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* cs = rope + t * half * 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = x0 * c - x1 * s;
        v[2 * i + 1] = x0 * s + x1 * c;
      }
    }
  }
}


void check_rows(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& out_slots, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decoder_layer: x must be a contiguous float32 [T, hidden] tensor");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.size(0) == x.size(0) &&
                  rope.size(1) * 2 == head_dim,
              "decoder_layer: rope must be float32 [T, head_dim/2, 2] (cos, sin)");
  TORCH_CHECK(out_slots.scalar_type() == at::kLong && out_slots.numel() == x.size(0),
              "decoder_layer: out_slots must be int64 [T]");
}

// the attention half of a layer given its input already normed, h [T, Kin] (rms_norm(x) for a
// target layer; [norm(emb) | norm(features)] for EAGLE3): QKV, RoPE, K/V stored at out_slots,
// attention over kv_slots, O; returns attn W_o^T [T, hidden] (no residual; with --tp this
// rank's partial sum)
at::Tensor attention_out(const at::Tensor& h, const at::Tensor& rope, const at::Tensor& qkv_w,
                         const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& out_slots, const Seqs& seqs, double scale,
                         int64_t act_bits) {
  const int64_t T = h.size(0), D = head_dim, H = num_heads, Hkv = num_kv_heads;
  const int64_t q_size = H * D, kv_size = Hkv * D;
  const int64_t S = k_cache.size(0);

  at::Tensor qkv = linear(h, qkv_w, qkv_s, act_bits);  // [T, q + 2 kv]
  TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size, "decoder_layer: qkv width does not match heads");
  at::Tensor q = at::empty({T, H, D}, h.options());
  float* qp = q.data_ptr<float>();
  const float* src = qkv.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* os = out_slots.data_ptr<int64_t>();
  std::vector<float> kbuf(T * kv_size);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * (q_size + 2 * kv_size);
    std::copy(row, row + q_size, qp + t * q_size);
    std::copy(row + q_size, row + q_size + kv_size, kbuf.data() + t * kv_size);
  }
  const float* rp = rope.data_ptr<float>();
  rope_inplace(qp, T, H, D, rp);
  rope_inplace(kbuf.data(), T, Hkv, D, rp);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = os[t];
    TORCH_CHECK(slot >= 0 && slot < S, "decoder_layer: slot ", slot, " outside the pool");
    const float* row = src + t * (q_size + 2 * kv_size);
    std::copy(kbuf.data() + t * kv_size, kbuf.data() + (t + 1) * kv_size, kc + slot * kv_size);
    std::copy(row + q_size + kv_size, row + q_size + 2 * kv_size, vc + slot * kv_size);
  }
  at::Tensor attn = paged_attention_seqs(q, k_cache, v_cache, seqs.starts, seqs.slots, seqs.masks, scale);  // [T, H, D]
  return linear(attn.view({T, q_size}), o_w, o_s, act_bits);
}

// the MLP half: (silu(g) * u) W_down^T with [g | u] = rms_norm(x) W_gu^T, x [T, hidden]; no
// residual (with --tp: this rank's partial sum)
at::Tensor mlp_out(const at::Tensor& x, const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                   const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t act_bits) {
  const int64_t T = x.size(0);
  at::Tensor gu = linear(rms_norm(x, post_norm, eps), gu_w, gu_s, act_bits);  // [T, 2 I]
  const int64_t I = gu.size(1) / 2;
  at::Tensor act = at::empty({T, I}, x.options());
  const float* gp = gu.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) silu_mul(gp + t * 2 * I, gp + t * 2 * I + I, ap + t * I, I);
  return linear(act, down_w, down_s, act_bits);
}

// attention + MLP of a Llama layer given the attention input already normed (h, as
// attention_out takes it) and the residual stream x [T, hidden]; returns x + attn + mlp
at::Tensor layer_body(const at::Tensor& h, const at::Tensor& x, const at::Tensor& rope, const at::Tensor& qkv_w,
                      const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s,
                      const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                      const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& out_slots, const Seqs& seqs, double scale,
                      int64_t act_bits) {
  check_rows(x, rope, out_slots, head_dim);
  at::Tensor out = x + attention_out(h, rope, qkv_w, qkv_s, o_w, o_s, num_heads, num_kv_heads, head_dim, k_cache,
                                     v_cache, out_slots, seqs, scale, act_bits);
  out.add_(mlp_out(out, post_norm, gu_w, gu_s, down_w, down_s, eps, act_bits));
  return out;
}

// the layer of decoder_layer over packed requests (the decoder stack's step)
at::Tensor decoder_layer_on(const at::Tensor& x, const at::Tensor& rope, const at::Tensor* w, double eps,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& out_slots, const Seqs& seqs, double scale,
                            int64_t act_bits) {
  return layer_body(rms_norm(x, w[0], eps), x, rope, w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], eps,
                    num_heads, num_kv_heads, head_dim, k_cache, v_cache, out_slots, seqs, scale, act_bits);
}

}  // namespace

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& in_norm,
                         const at::Tensor& qkv_w, const at::Tensor& qkv_s, const at::Tensor& o_w,
                         const at::Tensor& o_s, const at::Tensor& post_norm, const at::Tensor& gu_w,
                         const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s,
                         double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                         double scale, int64_t act_bits) {
  const at::Tensor w[10] = {in_norm, qkv_w, qkv_s, o_w, o_s, post_norm, gu_w, gu_s, down_w, down_s};
  return decoder_layer_on(x, rope, w, eps, num_heads, num_kv_heads, head_dim, k_cache, v_cache, out_slots,
                          one_seq(x.size(0), kv_slots, mask), scale, act_bits);
}

at::Tensor decoder_layer_attention(const at::Tensor& x, const at::Tensor& rope, const at::Tensor& in_norm,
                                   const at::Tensor& qkv_w, const at::Tensor& qkv_s, const at::Tensor& o_w,
                                   const at::Tensor& o_s, double eps, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t head_dim, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                                   double scale, int64_t act_bits) {
  check_rows(x, rope, out_slots, head_dim);
  return attention_out(rms_norm(x, in_norm, eps), rope, qkv_w, qkv_s, o_w, o_s, num_heads, num_kv_heads, head_dim,
                       k_cache, v_cache, out_slots, one_seq(x.size(0), kv_slots, mask), scale, act_bits);
}

at::Tensor decoder_layer_mlp(const at::Tensor& x, const at::Tensor& post_norm, const at::Tensor& gu_w,
                             const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s, double eps,
                             int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decoder_layer_mlp: x must be a contiguous float32 [T, hidden] tensor");
  return mlp_out(x, post_norm, gu_w, gu_s, down_w, down_s, eps, act_bits);
}

at::Tensor eagle3_layer_seqs(const at::Tensor& emb, const at::Tensor& feat, const at::Tensor& rope,
                             const at::Tensor& in_norm, const at::Tensor& hidden_norm, const at::Tensor& qkv_w,
                             const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s,
                             const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                             const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& out_slots,
                             const std::vector<int64_t>& starts, const std::vector<at::Tensor>& kv_slots,
                             const std::vector<at::Tensor>& masks, double scale, int64_t act_bits) {
  TORCH_CHECK(emb.dim() == 2 && feat.dim() == 2 && emb.sizes() == feat.sizes() &&
                  emb.scalar_type() == at::kFloat && feat.scalar_type() == at::kFloat &&
                  emb.is_contiguous() && feat.is_contiguous(),
              "eagle3_layer: emb and features must be contiguous float32 [T, hidden] tensors");
  at::Tensor h = at::cat({rms_norm(emb, in_norm, eps), rms_norm(feat, hidden_norm, eps)}, 1);  // [T, 2 hidden]
  return layer_body(h, feat, rope, qkv_w, qkv_s, o_w, o_s, post_norm, gu_w, gu_s, down_w, down_s, eps, num_heads,
                    num_kv_heads, head_dim, k_cache, v_cache, out_slots, Seqs{starts, kv_slots, masks}, scale,
                    act_bits);
}

at::Tensor eagle3_layer(const at::Tensor& emb, const at::Tensor& feat, const at::Tensor& rope,
                        const at::Tensor& in_norm, const at::Tensor& hidden_norm, const at::Tensor& qkv_w,
                        const at::Tensor& qkv_s, const at::Tensor& o_w, const at::Tensor& o_s,
                        const at::Tensor& post_norm, const at::Tensor& gu_w, const at::Tensor& gu_s,
                        const at::Tensor& down_w, const at::Tensor& down_s, double eps, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& out_slots, const at::Tensor& kv_slots,
                        const at::Tensor& mask, double scale, int64_t act_bits) {
  return eagle3_layer_seqs(emb, feat, rope, in_norm, hidden_norm, qkv_w, qkv_s, o_w, o_s, post_norm, gu_w, gu_s,
                           down_w, down_s, eps, num_heads, num_kv_heads, head_dim, k_cache, v_cache, out_slots,
                           {0, emb.size(0)}, {kv_slots}, {mask}, scale, act_bits);
}

std::vector<at::Tensor> decoder_stack_seqs(const at::Tensor& x, const at::Tensor& rope,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<at::Tensor>& k_caches,
                                           const std::vector<at::Tensor>& v_caches, double eps, int64_t num_heads,
                                           int64_t num_kv_heads, int64_t head_dim, const at::Tensor& out_slots,
                                           const std::vector<int64_t>& starts, const std::vector<at::Tensor>& kv_slots,
                                           const std::vector<at::Tensor>& masks, double scale,
                                           const std::vector<int64_t>& capture, int64_t act_bits) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * L && static_cast<int64_t>(v_caches.size()) == L,
              "decoder_stack: need 10 weights and one K and V cache per layer");
  const Seqs seqs{starts, kv_slots, masks};
  std::vector<at::Tensor> out(1 + capture.size());
  at::Tensor h = x.contiguous();
  for (int64_t i = 0; i < L; ++i) {
    for (size_t c = 0; c < capture.size(); ++c)
      if (capture[c] == i) out[1 + c] = h;
    h = decoder_layer_on(h, rope, weights.data() + 10 * i, eps, num_heads, num_kv_heads, head_dim, k_caches[i],
                         v_caches[i], out_slots, seqs, scale, act_bits);
  }
  out[0] = h;
  for (size_t c = 0; c < capture.size(); ++c)
    if (capture[c] == L) out[1 + c] = h;
  return out;
}

std::vector<at::Tensor> decoder_stack(const at::Tensor& x, const at::Tensor& rope, const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                                      double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                      const at::Tensor& out_slots, const at::Tensor& kv_slots, const at::Tensor& mask,
                                      double scale, const std::vector<int64_t>& capture, int64_t act_bits) {
  return decoder_stack_seqs(x, rope, weights, k_caches, v_caches, eps, num_heads, num_kv_heads, head_dim, out_slots,
                            {0, x.size(0)}, {kv_slots}, {mask}, scale, capture, act_bits);
}
