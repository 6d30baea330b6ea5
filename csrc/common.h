// Shared definitions of the block layout seen by every kernel (CPU and CUDA).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

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

inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace ssse
