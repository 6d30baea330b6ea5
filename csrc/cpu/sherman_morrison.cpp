#include "sherman_morrison.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

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
    const T* x = grads + blk.start;  // X = G^T: [m, s] with leading dimension d
    std::vector<double> ut(static_cast<size_t>(m * s));  // U^T = X F  [m, s]
    std::vector<double> c(static_cast<size_t>(m * m));   // [m, m]
    // U^T = X F^{-1} (F^{-1} symmetric).
    gemm<T, T>(m, s, s, 1.0, x, d, 1, f, s, 1, 0.0, ut.data(), s);
    // C = N I + sign X U  (U = (U^T)^T)
    gemm<T, double>(m, m, s, static_cast<double>(sign), x, d, 1, ut.data(), 1, s, 0.0, c.data(), m);
    for (int64_t i = 0; i < m; ++i) {
      c[static_cast<size_t>(i * m + i)] += normalizer;
      for (int64_t j = 0; j < i; ++j)  // average away rounding asymmetry
        c[static_cast<size_t>(i * m + j)] =
            0.5 * (c[static_cast<size_t>(i * m + j)] + c[static_cast<size_t>(j * m + i)]);
    }
    if (int64_t code = potrf_lower(m, c.data(), m)) {
      info[b] = code;
      return;
    }
    trsm_left_lower(m, s, c.data(), m, ut.data(), s);  // W^T = L^{-1} U^T
    const double* wt = ut.data();
    if constexpr (std::is_same_v<T, double>) {
      gemm<double, double>(s, s, m, -static_cast<double>(sign), wt, 1, s, wt, s, 1, 1.0, f, s, true);
      symmetrize_from_lower(s, f, s);
    } else {
      std::vector<double> fw(static_cast<size_t>(s * s));
      for (int64_t i = 0; i < s * s; ++i) fw[static_cast<size_t>(i)] = static_cast<double>(f[i]);
      gemm<double, double>(s, s, m, -static_cast<double>(sign), wt, 1, s, wt, s, 1, 1.0, fw.data(),
                           s, true);
      for (int64_t i = 0; i < s; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          const T val = static_cast<T>(fw[static_cast<size_t>(i * s + j)]);
          f[i * s + j] = val;
          f[j * s + i] = val;
        }
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
