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
