#include "gram.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Width of the column panels of a Gram block handed to one thread: small enough that a single
// large block still spreads over every thread, large enough to keep GEMM panels efficient.
constexpr int64_t kPanel = 192;

struct GramTask {
  int64_t block;
  int64_t j0;
  int64_t j1;
  int64_t cost;
};

}  // namespace

template <typename T>
void gram_accumulate(const T* grads, int64_t m, int64_t d, const int64_t* layout,
                     int64_t num_blocks, double* gram, int threads) {
  if (m <= 0 || num_blocks <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  std::vector<GramTask> tasks;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t s = blocks[b].size;
    for (int64_t j0 = 0; j0 < s; j0 += kPanel) {
      const int64_t j1 = std::min(s, j0 + kPanel);
      tasks.push_back({b, j0, j1, (s - j0) * (j1 - j0)});
    }
  }
  // Largest first, so the dynamic schedule ends with small tasks and balances well.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const GramTask& a, const GramTask& b) { return a.cost > b.cost; });
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
    const GramTask& task = tasks[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[task.block];
    const int64_t s = blk.size;
    const T* x = grads + blk.start + task.j0;
    // C[j0:s, j0:j1] += X[:, j0:s]^T X[:, j0:j1]; lower_only masks the diagonal tile.
    gemm<T, T>(s - task.j0, task.j1 - task.j0, m, 1.0, x, 1, d, x, d, 1, 1.0,
               gram + blk.offset + task.j0 * s + task.j0, s, /*lower_only=*/true);
  });
}

template <typename T>
void inverse_from_gram(double* gram, const int64_t* layout, int64_t num_blocks, double damping,
                       double normalizer, T* out, int64_t* info, int threads) {
  const BlockSpec* blocks = as_blocks(layout);
  const std::vector<int64_t> order = blocks_by_size(layout, num_blocks);
  const double inv_n = 1.0 / normalizer;
  parallel_for(num_blocks, threads, [&](int64_t t) {
    const int64_t b = order[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    double* a = gram + blk.offset;
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t j = 0; j <= i; ++j) a[i * s + j] *= inv_n;
      a[i * s + i] += damping;
    }
    info[b] = spd_inverse(s, a, s);
    if (info[b] != 0) return;
    T* o = out + blk.offset;
    for (int64_t i = 0; i < s * s; ++i) o[i] = static_cast<T>(a[i]);
  });
}

template void gram_accumulate<float>(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                     double*, int);
template void gram_accumulate<double>(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                      double*, int);
template void inverse_from_gram<float>(double*, const int64_t*, int64_t, double, double, float*,
                                       int64_t*, int);
template void inverse_from_gram<double>(double*, const int64_t*, int64_t, double, double, double*,
                                        int64_t*, int);

}  // namespace ssse::cpu
