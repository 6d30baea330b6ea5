// Work plans of the tensor-core kernels: one CTA per work item (a tile of one block, or one group of
// small blocks), with no CTA spent on an empty tile whatever the mix of block sizes.
//
// Blocks are put into classes by a key (tiles per side, or 0 for a group of small blocks). The
// host counts the classes from its copy of the layout table; a device kernel writes `order`, the
// block indices sorted by class (key descending), so that a class is a contiguous range of ranks
// and "every block with more than K tiles" is a prefix. Each launch gets a ClassTable by value
// (a __grid_constant__ parameter: no copy to the device, no host synchronisation), from which a
// CTA finds its class, its block and its item within the block in a few parameter reads.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "device.cuh"
#include "tile.cuh"

namespace ssse::cuda::tc {

// Blocks of at most kGroupMax parameters that are adjacent in the flat vector and start in the same
// kGroupMax-aligned window are accumulated together by one Gram CTA: the group spans fewer than
// 2 kGroupMax = kGramTile columns.
constexpr int kGramTile = 128;
constexpr int kGroupMax = 64;
// Pivot width of the blocked inverse and tile of the Woodbury pass.
constexpr int kTile = 64;
// Rows of a block per CTA of the apply.
constexpr int kApplyRows = 16;

constexpr int kMaxClasses = 32;
struct ClassTable {
  int count;                        // classes in this launch
  int tiles[kMaxClasses];           // key of class c: tiles per side, 0 for groups of small blocks
  int64_t per_block[kMaxClasses];   // work items per block of class c
  int64_t rank0[kMaxClasses];       // position in order[] of the first block of class c
  int64_t item_end[kMaxClasses];    // items of classes 0..c of this launch (inclusive prefix)
  int64_t first[kMaxClasses];       // number of the class's first item over all launches of
                                    // the kernel (a unique slot per item across launches)
  int64_t aux[kMaxClasses];         // a per-class value of the caller's (see Plan::tables)
};

constexpr int kRankSlots = 128;
struct RankTable {
  int key_lo, key_hi;               // keys handled by this launch of the order kernel
  int64_t rank0[kRankSlots];        // rank of the first block of key key_lo + i
};

enum class Keying : int { kGram = 0, kSweep = 1, kApply = 2 };

__host__ __device__ inline int64_t tiles_of(int64_t size, int64_t tile) {
  return (size + tile - 1) / tile;
}

// Whether block b continues the group of small blocks that block p = b - 1 belongs to.
__host__ __device__ inline bool continues_group(const int64_t* layout, int64_t p, int64_t b) {
  const int64_t sp = layout[3 * p + 1], sb = layout[3 * b + 1];
  if (sp <= 0 || sp > kGroupMax || sb <= 0 || sb > kGroupMax) return false;
  const int64_t stp = layout[3 * p], stb = layout[3 * b];
  return stp + sp == stb && stp / kGroupMax == stb / kGroupMax;
}

// Class key of block b: tiles per side (>= 1); 0 for the first block of a group of small blocks
// (Gram only); -1 for a block with no work of its own (empty, or inside a group).
__host__ __device__ inline int block_key(const int64_t* layout, int64_t b, Keying keying) {
  const int64_t s = layout[3 * b + 1];
  if (s <= 0) return -1;
  if (keying == Keying::kSweep) return static_cast<int>(tiles_of(s, kTile));
  if (keying == Keying::kApply) return static_cast<int>(tiles_of(s, kApplyRows));
  if (s > kGroupMax) return static_cast<int>(tiles_of(s, kGramTile));
  return (b > 0 && continues_group(layout, b - 1, b)) ? -1 : 0;
}

struct WorkItem {
  int64_t block;  // index into the layout table
  int tiles;      // class key
  int64_t index;  // item within the block
  int64_t rank;   // position of the block in order[]
  int64_t slot;   // number of the item over all launches of the kernel
  int64_t aux;    // the aux value of the block's class entry
  int64_t nth;    // position of the block within its class entry
};

// The work item of CTA q of a launch.
__device__ __forceinline__ WorkItem find_work(const ClassTable& table, const int64_t* order,
                                              int64_t q) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (q < table.item_end[mid])
      hi = mid;
    else
      lo = mid + 1;
  }
  const int64_t local = q - (lo > 0 ? table.item_end[lo - 1] : 0);
  const int64_t per = table.per_block[lo];
  const int64_t rank = table.rank0[lo] + local / per;
  return WorkItem{order[rank], table.tiles[lo], local % per, rank, table.first[lo] + local,
                  table.aux[lo], local / per};
}

// order[rank] = b for every block with a key in [key_lo, key_hi]; cursor [max key + 1] zeroed.
// (A template only so that every translation unit may include its definition.)
template <typename Unused = void>
__global__ void __launch_bounds__(256)
    plan_order_kernel(const int64_t* __restrict__ layout,  // [num_blocks, 3]
                      int64_t num_blocks, int keying, const __grid_constant__ RankTable table,
                      int* __restrict__ cursor,            // [max key + 1]
                      int64_t* __restrict__ order) {       // [ranked]
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_blocks) return;
  const int key = block_key(layout, b, static_cast<Keying>(keying));
  if (key < table.key_lo || key > table.key_hi) return;
  const int pos = atomicAdd(cursor + key, 1);
  order[table.rank0[key - table.key_lo] + pos] = b;
}

// ---- host side ----------------------------------------------------------------------------------

struct HostClass {
  int key;
  int64_t count;  // blocks
  int64_t rank0;  // first rank
};

class Plan {
 public:
  Plan(const int64_t* layout_host, int64_t num_blocks, Keying keying) : keying_(keying) {
    std::vector<int64_t> counts;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int key = block_key(layout_host, b, keying);
      if (key < 0) continue;
      if (static_cast<size_t>(key) >= counts.size()) counts.resize(static_cast<size_t>(key) + 1, 0);
      ++counts[static_cast<size_t>(key)];
    }
    max_key_ = static_cast<int>(counts.size()) - 1;
    for (int key = max_key_; key >= 0; --key) {
      const int64_t c = counts[static_cast<size_t>(key)];
      if (c == 0) continue;
      classes_.push_back(HostClass{key, c, ranked_});
      ranked_ += c;
    }
  }

  const std::vector<HostClass>& classes() const { return classes_; }
  int64_t ranked() const { return ranked_; }
  bool empty() const { return ranked_ == 0; }

  // Device workspace: the order array and the per-key cursors.
  size_t workspace_bytes() const {
    return detail::section_bytes(sizeof(int64_t) * static_cast<size_t>(std::max<int64_t>(ranked_, 1))) +
           detail::section_bytes(sizeof(int) * static_cast<size_t>(max_key_ + 2));
  }

  // Writes order[] into the workspace (on `stream`); returns it.
  int64_t* build(const int64_t* layout_dev, int64_t num_blocks, void* work, size_t work_bytes,
                 cudaStream_t stream) const {
    if (work_bytes < workspace_bytes())
      throw std::invalid_argument("work must hold " + std::to_string(workspace_bytes()) +
                                  " bytes, got " + std::to_string(work_bytes));
    int64_t* order = static_cast<int64_t*>(work);
    int* cursor = reinterpret_cast<int*>(
        static_cast<char*>(work) +
        detail::section_bytes(sizeof(int64_t) * static_cast<size_t>(std::max<int64_t>(ranked_, 1))));
    if (ranked_ == 0) return order;
    SSSE_CUDA_CHECK(
        cudaMemsetAsync(cursor, 0, sizeof(int) * static_cast<size_t>(max_key_ + 1), stream));
    const unsigned grid = static_cast<unsigned>((num_blocks + 255) / 256);
    for (int lo = 0; lo <= max_key_; lo += kRankSlots) {
      RankTable table{};
      table.key_lo = lo;
      table.key_hi = std::min(max_key_, lo + kRankSlots - 1);
      bool any = false;
      for (const HostClass& c : classes_)
        if (c.key >= table.key_lo && c.key <= table.key_hi) {
          table.rank0[c.key - lo] = c.rank0;
          any = true;
        }
      if (!any) continue;
      dev::launch(plan_order_kernel<>, dim3(grid), dim3(256), 0, stream, layout_dev, num_blocks,
                  static_cast<int>(keying_), table, cursor, order);
    }
    return order;
  }

  // Launch tables for a kernel with items(key) work items per block, over the classes whose key
  // passes keep(key); each table holds at most kMaxClasses classes and 2^31 - 1 items. aux(class,
  // blocks of the class placed before this entry) fills ClassTable::aux.
  template <typename Items, typename Keep>
  std::vector<std::pair<ClassTable, int64_t>> tables(Items items, Keep keep) const {
    return tables(items, keep, [](const HostClass&, int64_t) -> int64_t { return 0; });
  }

  template <typename Items, typename Keep, typename Aux>
  std::vector<std::pair<ClassTable, int64_t>> tables(Items items, Keep keep, Aux aux) const {
    std::vector<std::pair<ClassTable, int64_t>> out;
    ClassTable cur{};
    int64_t total = 0, numbered = 0;
    auto flush = [&]() {
      if (cur.count > 0) out.emplace_back(cur, total);
      cur = ClassTable{};
      total = 0;
    };
    constexpr int64_t kMaxGrid = 2147483647;
    for (const HostClass& c : classes_) {
      if (!keep(c.key)) continue;
      const int64_t per = items(c.key);
      if (per <= 0) continue;
      int64_t done = 0;  // blocks of this class already placed
      while (done < c.count) {
        if (cur.count == kMaxClasses || total + per > kMaxGrid) flush();
        const int64_t fit = std::min(c.count - done, (kMaxGrid - total) / per);
        cur.tiles[cur.count] = c.key;
        cur.per_block[cur.count] = per;
        cur.rank0[cur.count] = c.rank0 + done;
        cur.first[cur.count] = numbered;
        cur.aux[cur.count] = aux(c, done);
        total += fit * per;
        numbered += fit * per;
        cur.item_end[cur.count] = total;
        ++cur.count;
        done += fit;
      }
    }
    flush();
    return out;
  }

  // Items of items(key) per block over the classes before class index ci (kept by keep).
  template <typename Items, typename Keep>
  int64_t items_before(const HostClass& target, Items items, Keep keep) const {
    int64_t n = 0;
    for (const HostClass& c : classes_) {
      if (c.rank0 == target.rank0) break;
      if (keep(c.key)) n += c.count * items(c.key);
    }
    return n;
  }

  // Number of blocks whose key passes keep(key): a prefix of order[] when keep is "key > K".
  template <typename Keep>
  int64_t count(Keep keep) const {
    int64_t n = 0;
    for (const HostClass& c : classes_)
      if (keep(c.key)) n += c.count;
    return n;
  }

  int max_key() const { return max_key_; }

 private:
  Keying keying_;
  std::vector<HostClass> classes_;
  int64_t ranked_ = 0;
  int max_key_ = -1;
};

}  // namespace ssse::cuda::tc
