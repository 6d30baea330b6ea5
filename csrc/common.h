// Shared definitions of the block layout seen by every kernel (CPU and CUDA).
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace ssse {

// One row of the layout table: the block covers parameters [start, start + size) of the flat
// vector and its size x size matrix lives at element `offset` of the packed block storage.
struct BlockSpec {
  int64_t start;
  int64_t size;
  int64_t offset;
};
static_assert(sizeof(BlockSpec) == 3 * sizeof(int64_t), "layout rows are three int64s");

inline const BlockSpec* as_blocks(const int64_t* layout) {
  return reinterpret_cast<const BlockSpec*>(layout);
}

// One row of the table of low-rank ("dual") blocks, whose inverse is kept as
//   F_b^{-1} = (1/damping) [I - G_b^T K_b^{-1} G_b],   K_b = damping N I + G_b G_b^T = L_b L_b^T.
// The block covers parameters [start, start + size) of the flat vector. All dual blocks of a
// table share the number of stored gradient rows R (one row is one gradient of the whole flat
// vector, restricted to each block) and a row capacity C >= R (the leading dimension "ldl"):
//   G_b: [C, size] row-major at element g_offset of the packed G storage (input dtype); rows
//        [0, R) hold the block slices of the stored gradients, in the order they were added;
//   L_b: [C, C] row-major (float64) at element l_offset of the packed factor storage; its
//        lower triangle [0, R) x [0, R) holds the Cholesky factor of K_b, nothing else is read.
//        While rows [R, R + m) are being added, their lower part holds the new rows of the raw
//        Gram matrix G_b G_b^T (columns [0, R + m)) until the factor is extended over them.
// The kernels take R ("rows") and C ("ldl") as arguments; offsets are free (ssse_ext packs
// blocks consecutively: g_offset = C * sum of earlier sizes, l_offset = index * C * C).
struct DualSpec {
  int64_t start;
  int64_t size;
  int64_t g_offset;
  int64_t l_offset;
};
static_assert(sizeof(DualSpec) == 4 * sizeof(int64_t), "dual table rows are four int64s");

inline const DualSpec* as_dual(const int64_t* table) {
  return reinterpret_cast<const DualSpec*>(table);
}

// Block indices, largest block first: the order in which to hand blocks to threads so that the
// dynamic schedule ends on small ones.
inline std::vector<int64_t> blocks_by_size(const int64_t* layout, int64_t num_blocks) {
  const BlockSpec* blocks = as_blocks(layout);
  std::vector<int64_t> order(static_cast<size_t>(num_blocks));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return blocks[a].size > blocks[b].size; });
  return order;
}

inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace ssse
