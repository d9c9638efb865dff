// The output side shared by the integer linear kernels (w8_linear.cpp, w4_linear.cpp):
// threads take pairs of TILE-channel tiles, `compute(t0, nt, buf)` writes the M x (TILE nt) block
// of tiles t0 .. t0 + nt - 1 into buf (row stride 2 TILE), and the block lands in y [M, N] times
// the per-channel scale (if any) plus the bias (if any). `scope()` is called once per thread
// before its first pair and the object it returns lives until the thread's last pair is done
// (AMX: the tile configuration, loaded once per thread instead of once per pair). Header-only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

struct NoScope {};

template <int64_t kTile, class Compute, class Scope>
void for_tile_pairs(int64_t M, int64_t N, int64_t tiles, const float* scale, const float* bias, float* y,
                    Compute compute, Scope scope) {
  const int64_t pairs = (tiles + 1) / 2;  // two tiles at a time (M = 1 streams both together)
  at::parallel_for(0, pairs, 4, [&](int64_t p0, int64_t p1) {
    const auto guard = scope();
    std::vector<float> buf(M * 2 * kTile);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t0 = 2 * p, nt = std::min<int64_t>(2, tiles - t0);
      compute(t0, nt, buf.data());
      const int64_t n0 = t0 * kTile, cols = std::min(nt * kTile, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        float* dst = y + m * N + n0;
        const float* src = buf.data() + m * 2 * kTile;
        for (int64_t j = 0; j < cols; ++j) {
          const float v = scale != nullptr ? src[j] * scale[n0 + j] : src[j];
          dst[j] = bias != nullptr ? v + bias[n0 + j] : v;
        }
      }
    }
  });
}

template <int64_t kTile, class Compute>
void for_tile_pairs(int64_t M, int64_t N, int64_t tiles, const float* scale, const float* bias, float* y,
                    Compute compute) {
  for_tile_pairs<kTile>(M, N, tiles, scale, bias, y, compute, [] { return NoScope{}; });
}
