#include "apply.h"

#include <algorithm>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Rows of a block handed to one task: the apply is bandwidth-bound, so tasks are row ranges.
constexpr int64_t kRowsPerTask = 64;
// From this many right-hand sides on, the packed GEMM beats row-by-row dot products.
constexpr int64_t kGemmColumns = 16;

struct Task {
  int64_t block;
  int64_t row0;
  int64_t row1;
};
}  // namespace

template <typename T>
void apply_inverse(const T* inv, const int64_t* layout, int64_t num_blocks, const T* v, int64_t d,
                   int64_t r, const T* base, double scale, T* out, int threads) {
  (void)d;
  if (r <= 0 || num_blocks <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t r0 = 0; r0 < blocks[b].size; r0 += kRowsPerTask)
      tasks.push_back({b, r0, std::min(blocks[b].size, r0 + kRowsPerTask)});
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
    const Task& task = tasks[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[task.block];
    const int64_t s = blk.size, rows = task.row1 - task.row0;
    const T* f = inv + blk.offset + task.row0 * s;  // rows [row0, row1) of F_b^{-1}
    std::vector<double> prod(static_cast<size_t>(rows * r));  // [rows, r]
    if (r >= kGemmColumns) {
      gemm<T, T>(rows, r, s, 1.0, f, s, 1, v + blk.start * r, r, 1, 0.0, prod.data(), r);
    } else {
      rows_times(f, rows, s, v + blk.start * r, r, prod.data());
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = blk.start + task.row0 + i;
      for (int64_t c = 0; c < r; ++c) {
        const double b0 = base != nullptr ? static_cast<double>(base[row * r + c]) : 0.0;
        out[row * r + c] = static_cast<T>(b0 + scale * prod[static_cast<size_t>(i * r + c)]);
      }
    }
  });
}

template void apply_inverse<float>(const float*, const int64_t*, int64_t, const float*, int64_t,
                                   int64_t, const float*, double, float*, int);
template void apply_inverse<double>(const double*, const int64_t*, int64_t, const double*, int64_t,
                                    int64_t, const double*, double, double*, int);

}  // namespace ssse::cpu
