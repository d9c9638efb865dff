// The k best log-probabilities of each row of logits, in one pass plus a normaliser pass:
//
//   vals[r, j] = log_softmax(logits[r])[idx[r, j]],  idx[r] = the k largest logits of row r, best
//   first (equal logits: the smaller index first)
//
//   logits [R, V] float32, contiguous; k in [1, V]. Returns (vals [R, k] float32, idx [R, k] int64).
//
// What EAGLE3 tree drafting asks of every frontier node each step (a node's children are its k
// best draft tokens, scored by cumulative log-probability). torch.log_softmax + torch.topk over
// [4, 8192] costs ~150 us on 2 cores (topk alone ~90); this is ~10 us a row: a running top-k
// behind an 8-wide threshold test, and max / sum-of-exp over the row with exp8. Serial: the rows
// are few and a parallel region would cost more than it saves. Reference: `top_logprobs_reference`
// in kernels/cpu_kernels.py.

#include "cpu_kernels.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// insert (v, i) into the descending list (vals, idx) of n < cap entries or replace its last;
// after equal values, so the earlier index stays first
inline void insert(float v, int64_t i, float* vals, int64_t* idx, int64_t& n, int64_t cap) {
  int64_t j = n < cap ? n++ : cap - 1;
  while (j > 0 && vals[j - 1] < v) {
    vals[j] = vals[j - 1];
    idx[j] = idx[j - 1];
    --j;
  }
  vals[j] = v;
  idx[j] = i;
}

void row_top(const float* x, int64_t V, int64_t k, float* vals, int64_t* idx) {
  int64_t n = 0;
  int64_t i = 0;
  for (; i < k; ++i) insert(x[i], i, vals, idx, n, k);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < k; ++j) vmax = _mm256_max_ps(vmax, _mm256_set1_ps(x[j]));
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmax = _mm256_max_ps(vmax, v);
    int bits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
    while (bits != 0) {  // lanes above the current k-th best, in index order
      const int lane = __builtin_ctz(bits);
      bits &= bits - 1;
      if (x[i + lane] > vals[k - 1]) insert(x[i + lane], i + lane, vals, idx, n, k);
    }
  }
  float mx = vals[0];
  for (; i < V; ++i) {
    if (x[i] > vals[k - 1]) insert(x[i], i, vals, idx, n, k);
    mx = std::max(mx, x[i]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float l : lanes) mx = std::max(mx, l);
  // log-sum-exp around the maximum
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), m8)));
  _mm256_store_ps(lanes, acc);
  double sum = 0.0;
  for (float l : lanes) sum += l;
  for (; j < V; ++j) sum += std::exp(x[j] - mx);
  const float lse = mx + static_cast<float>(std::log(sum));
  for (int64_t t = 0; t < k; ++t) vals[t] -= lse;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> top_logprobs(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "top_logprobs: logits must be a contiguous float32 CPU matrix [R, V]");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "top_logprobs: k must be in [1, V]; got k=", k, " for V=", V);
  auto vals = at::empty({R, k}, logits.options());
  auto idx = at::empty({R, k}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) row_top(x + r * V, V, k, vals.data_ptr<float>() + r * k, idx.data_ptr<int64_t>() + r * k);
  return {vals, idx};
}
