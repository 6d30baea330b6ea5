#include "sherman_morrison.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Rows per rank-m Woodbury step inside one call: large enough for GEMM efficiency, small enough
// that the m x m systems stay cheap and accurate.
constexpr int64_t kStepRows = 64;
}  // namespace

template <typename T>
void sherman_morrison_rank1(T* inv, const int64_t* layout, int64_t num_blocks, const T* grads,
                            int64_t m, int64_t d, double normalizer, int sign, int64_t* info,
                            int threads) {
  const BlockSpec* blocks = as_blocks(layout);
  const std::vector<int64_t> order = blocks_by_size(layout, num_blocks);
  const T n = static_cast<T>(normalizer);
  const T sgn = static_cast<T>(sign);
  parallel_for(num_blocks, threads, [&](int64_t t) {
    const int64_t b = order[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    T* f = inv + blk.offset;
    info[b] = 0;
    std::vector<T> v(static_cast<size_t>(s));
    for (int64_t r = 0; r < m; ++r) {
      const T* g = grads + r * d + blk.start;
      T gv = 0;
      for (int64_t i = 0; i < s; ++i) {
        const T* fi = f + i * s;
        T acc = 0;
        for (int64_t j = 0; j < s; ++j) acc += fi[j] * g[j];
        v[static_cast<size_t>(i)] = acc;
        gv += g[i] * acc;
      }
      const T den = n + sgn * gv;
      if (!(den > T(0)) || !std::isfinite(static_cast<double>(den))) {
        info[b] = r + 1;
        return;
      }
      const T coef = sgn / den;
      for (int64_t i = 0; i < s; ++i) {
        T* fi = f + i * s;
        const T vi = coef * v[static_cast<size_t>(i)];
        for (int64_t j = 0; j < s; ++j) fi[j] -= vi * v[static_cast<size_t>(j)];
      }
    }
  });
}

template <typename T>
void sherman_morrison_chunk(T* inv, const int64_t* layout, int64_t num_blocks, const T* grads,
                            int64_t m, int64_t d, double normalizer, int sign, int64_t* info,
                            int threads) {
  const BlockSpec* blocks = as_blocks(layout);
  const std::vector<int64_t> order = blocks_by_size(layout, num_blocks);
  parallel_for(num_blocks, threads, [&](int64_t t) {
    const int64_t b = order[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    info[b] = 0;
    if (m == 0) return;
    T* f = inv + blk.offset;
    // The block in float64 for the whole call (float32 storage is converted once, not once
    // per rank-m step). Between steps only its lower triangle is kept (the products with it
    // read that triangle only); it is written in full, symmetric, at the end.
    std::vector<double> copy;
    double* fw;
    if constexpr (std::is_same_v<T, double>) {
      fw = f;
    } else {
      copy.assign(f, f + s * s);
      fw = copy.data();
    }
    std::vector<double> ut(static_cast<size_t>(std::min(m, kStepRows) * s));  // U^T [m_t, s]
    std::vector<double> c(static_cast<size_t>(kStepRows * kStepRows));        // C [m_t, m_t]
    for (int64_t r0 = 0; r0 < m; r0 += kStepRows) {
      const int64_t mt = std::min(kStepRows, m - r0);
      const T* x = grads + r0 * d + blk.start;  // X = G_t^T: [mt, s] with leading dimension d
      // U^T = X F^{-1} (F^{-1} symmetric); C = N I + sign X U.
      gemm_symmetric_b<T>(mt, s, 1.0, x, d, 1, fw, s, 0.0, ut.data(), s);
      gemm<T, double>(mt, mt, s, static_cast<double>(sign), x, d, 1, ut.data(), 1, s, 0.0,
                      c.data(), mt);
      for (int64_t i = 0; i < mt; ++i) {
        c[static_cast<size_t>(i * mt + i)] += normalizer;
        for (int64_t j = 0; j < i; ++j)  // average away rounding asymmetry
          c[static_cast<size_t>(i * mt + j)] =
              0.5 * (c[static_cast<size_t>(i * mt + j)] + c[static_cast<size_t>(j * mt + i)]);
      }
      if (int64_t code = potrf_lower(mt, c.data(), mt)) {
        info[b] = r0 + code;  // float32 blocks are left unchanged; float64 ones part-updated
        if constexpr (std::is_same_v<T, double>) symmetrize_from_lower(s, fw, s);
        return;
      }
      trsm_left_lower(mt, s, c.data(), mt, ut.data(), s);  // W^T = L^{-1} U^T
      gemm<double, double>(s, s, mt, -static_cast<double>(sign), ut.data(), 1, s, ut.data(), s,
                           1, 1.0, fw, s, true);
    }
    symmetrize_from_lower(s, fw, s);
    if constexpr (!std::is_same_v<T, double>) {
      for (int64_t i = 0; i < s * s; ++i) f[i] = static_cast<T>(fw[i]);
    }
  });
}

template void sherman_morrison_rank1<float>(float*, const int64_t*, int64_t, const float*, int64_t,
                                            int64_t, double, int, int64_t*, int);
template void sherman_morrison_rank1<double>(double*, const int64_t*, int64_t, const double*,
                                             int64_t, int64_t, double, int, int64_t*, int);
template void sherman_morrison_chunk<float>(float*, const int64_t*, int64_t, const float*, int64_t,
                                            int64_t, double, int, int64_t*, int);
template void sherman_morrison_chunk<double>(double*, const int64_t*, int64_t, const double*,
                                             int64_t, int64_t, double, int, int64_t*, int);

}  // namespace ssse::cpu
