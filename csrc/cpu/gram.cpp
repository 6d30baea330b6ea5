#include "gram.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Column ranges of a Gram block handed to one thread: about 4 per thread over all blocks (a
// single large block still spreads over every thread and the dynamic schedule balances), each
// at least kMinWidth columns wide. Each range reads the block's columns right of its start once.
constexpr int64_t kMinWidth = 96;
constexpr int64_t kTasksPerThread = 4;

struct GramTask {
  int64_t block;
  int64_t j0;
  int64_t j1;
  int64_t cost;
};

// [j0, j1) ranges of about equal work (lower-triangle entries) covering [0, s).
std::vector<std::pair<int64_t, int64_t>> column_ranges(int64_t s, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, s / kMinWidth));
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t j0 = 0;
  for (int64_t t = 1; t <= parts && j0 < s; ++t) {
    // the first j1 columns hold t/parts of the triangle: 1 - (1 - j1/s)^2 = t/parts; cuts at
    // multiples of 8
    const double cut = s * (1.0 - std::sqrt(1.0 - double(t) / double(parts)));
    int64_t j1 = t == parts ? s : 8 * static_cast<int64_t>(std::llround(cut / 8.0));
    j1 = std::min(s, std::max(j1, j0 + 8));
    out.emplace_back(j0, j1);
    j0 = j1;
  }
  return out;
}

}  // namespace

template <typename T>
void gram_accumulate(const T* grads, int64_t m, int64_t d, const int64_t* layout,
                     int64_t num_blocks, double* gram, int threads) {
  if (m <= 0 || num_blocks <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  double total = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) total += double(blocks[b].size) * blocks[b].size;
  const double per_task = threads > 1 ? total / double(kTasksPerThread * threads) : total;
  std::vector<GramTask> tasks;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t s = blocks[b].size;
    if (s <= 0) continue;
    const auto parts = static_cast<int64_t>(std::ceil(double(s) * s / std::max(per_task, 1.0)));
    for (const auto& [j0, j1] : column_ranges(s, parts))
      tasks.push_back({b, j0, j1, (j1 - j0) * (2 * s - j0 - j1)});
  }
  // Largest first, so the dynamic schedule ends with small tasks and balances well.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const GramTask& a, const GramTask& b) { return a.cost > b.cost; });
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
    const GramTask& task = tasks[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[task.block];
    // gram_b[j0:s, j0:j1] += X_b[:, j0:s]^T X_b[:, j0:j1], lower part
    gram_lower<T>(blk.size, task.j0, task.j1, m, grads + blk.start, d, gram + blk.offset,
                  blk.size);
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

void gram_product(const double* gram, const int64_t* layout, int64_t num_blocks, const double* x,
                  int64_t r, double* out, int threads) {
  if (r <= 0 || num_blocks <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  parallel_for(num_blocks, threads, [&](int64_t b) {
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    if (s <= 0) return;
    // C = X_b^T G_b [r, s] (A(i, k) = X_b(k, i)), then out_b += C^T
    std::vector<double> c(static_cast<size_t>(r * s));
    gemm_symmetric_b<double>(r, s, 1.0, x + blk.start * r, 1, r, gram + blk.offset, s, 0.0,
                             c.data(), s);
    for (int64_t i = 0; i < s; ++i) {
      double* o = out + (blk.start + i) * r;
      for (int64_t j = 0; j < r; ++j) o[j] += c[static_cast<size_t>(j * s + i)];
    }
  });
}

template <typename T>
void rows_product(const T* rows, int64_t m, int64_t d, const int64_t* layout, int64_t num_blocks,
                  const double* x, int64_t r, double sign, double* sketch, int threads) {
  if (m <= 0 || r <= 0 || num_blocks <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  parallel_for(num_blocks, threads, [&](int64_t b) {
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    if (s <= 0) return;
    const T* rb = rows + blk.start;  // R_b [m, s], leading dimension d
    // r is a few columns: too narrow for the packed GEMM's register tile. R_b X_b by dot
    // products with X_b's columns, then (R_b X_b)^T R_b streaming R_b's rows in place.
    std::vector<double> rx(static_cast<size_t>(m * r)), out(static_cast<size_t>(r * s));
    rows_times<T, double>(rb, m, s, x + blk.start * r, r, rx.data(), d);
    gemm_rows_b<T>(r, s, m, rx.data(), 1, r, rb, d, out.data(), s);
    double* sk = sketch + blk.start * r;
    for (int64_t j = 0; j < s; ++j)
      for (int64_t c = 0; c < r; ++c) sk[j * r + c] += sign * out[static_cast<size_t>(c * s + j)];
  });
}

template void rows_product<float>(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                  const double*, int64_t, double, double*, int);
template void rows_product<double>(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                   const double*, int64_t, double, double*, int);
template void gram_accumulate<float>(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                     double*, int);
template void gram_accumulate<double>(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                      double*, int);
template void inverse_from_gram<float>(double*, const int64_t*, int64_t, double, double, float*,
                                       int64_t*, int);
template void inverse_from_gram<double>(double*, const int64_t*, int64_t, double, double, double*,
                                        int64_t*, int);

}  // namespace ssse::cpu
