// The index of each row's largest logit: greedy decoding and greedy tree verification.
//
//   idx[r] = argmax_j logits[r, j]  (equal maxima: the smallest index; a row holding a NaN: its
//            first NaN, as torch.argmax does)
//
//   logits [R, V] float32, contiguous, V >= 1. Returns idx [R] int64.
//
// torch.argmax over a 49152-wide row costs ~150 us on this project's 2-core machines (a scalar
// reduction); this is a max pass of 8 lanes plus a pass for the first index equal to it, over a
// row that stays in L2. Serial: rows are few (a decode batch, a tree's nodes) and each is short
// work. Reference: torch.argmax (`argmax_rows` in kernels/cpu_kernels.py falls back to it).

#include "cpu_kernels.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cmath>
#include <limits>

namespace {

int64_t argmax_row(const float* x, int64_t V) {
  const int64_t V8 = V / 8 * 8;
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t j = 0; j < V8; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float m = lanes[0];
  for (int u = 1; u < 8; ++u) m = std::max(m, lanes[u]);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = V8; j < V; ++j) {
    if (std::isnan(x[j])) has_nan = true;
    else m = std::max(m, x[j]);
  }
  if (has_nan) {
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(x[j])) return j;
  }
  const __m256 vm = _mm256_set1_ps(m);
  for (int64_t j = 0; j < V8; j += 8) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), vm, _CMP_EQ_OQ));
    if (bits != 0) return j + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (int64_t j = V8; j < V; ++j)
    if (x[j] == m) return j;
  return 0;  // (unreachable: m is one of the row's values)
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "argmax_rows: logits must be a contiguous float32 [R, V] tensor");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "argmax_rows: rows must not be empty");
  auto idx = at::empty({R}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* out = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) out[r] = argmax_row(x + r * V, V);
  return idx;
}
