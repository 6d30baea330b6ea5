// Building blocks shared by the CUDA kernels: the block layout on the device, 64 x 64 output
// tiles computed from shared-memory operand slices with register blocking, the cooperative loads
// that stage those slices, and the host-side launch helpers.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace ssse::cuda::detail {

// Output tiles are kTile x kTile; it is also the sub-chunk width of the Woodbury kernels and the
// pivot width of the blocked inverse, so that every tile boundary is a pivot boundary.
constexpr int kTile = 64;
// Depth of one operand slice staged in shared memory.
constexpr int kSlice = 16;
// Leading dimension of the shared tiles: +4 keeps 16-byte alignment of rows and spreads the
// transposed stores of a warp over all banks.
constexpr int kLd = kTile + 4;

struct Block {
  int64_t start;   // first parameter of the block in the flat vector
  int64_t size;    // s_b
  int64_t offset;  // element offset of the s_b x s_b matrix in packed storage
};

__device__ __forceinline__ Block load_block(const int64_t* __restrict__ layout, int64_t b) {
  return Block{layout[3 * b], layout[3 * b + 1], layout[3 * b + 2]};
}

// min(rem, cap) as an int: the extent of a partial tile or slice.
__device__ __forceinline__ int clamp_extent(int64_t rem, int cap = kTile) {
  return rem < cap ? static_cast<int>(rem) : cap;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile (ti, tj), ti >= tj, of the lower triangle from its linear index t = ti (ti + 1) / 2 + tj.
__device__ __forceinline__ void lower_tile(int64_t t, int& ti, int& tj) {
  int i = static_cast<int>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (static_cast<int64_t>(i) * (i + 1) / 2 > t) --i;
  while (static_cast<int64_t>(i + 1) * (i + 2) / 2 <= t) ++i;
  ti = i;
  tj = static_cast<int>(t - static_cast<int64_t>(i) * (i + 1) / 2);
}

// Threads of a tile computed with TM x TM register blocks: a (kTile/TM) x (kTile/TM) grid.
// Thread (tx, ty) owns rows ty + kStride * a and columns tx + kStride * b (a, b < TM): within a
// warp the row operand is a broadcast and the column operand consecutive words, so both shared
// loads are conflict-free, and global accesses of a row are contiguous across tx.
template <int TM>
struct Micro {
  static constexpr int kStride = kTile / TM;
  static constexpr int kThreads = kStride * kStride;
};

// acc[a][b] += sum_k As[k][row_a] * Bs[k][col_b] over one slice (kSlice values of k).
// As, Bs: shared [kSlice][kLd] (row k of the slice is contiguous in the output index).
template <int TM, typename Acc, typename S>
__device__ __forceinline__ void tile_fma(Acc (&acc)[TM][TM], const S* __restrict__ As,
                                         const S* __restrict__ Bs, int tx, int ty) {
  constexpr int kStride = Micro<TM>::kStride;
#pragma unroll
  for (int k = 0; k < kSlice; ++k) {
    Acc a[TM], b[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = static_cast<Acc>(As[k * kLd + ty + kStride * i]);
#pragma unroll
    for (int j = 0; j < TM; ++j) b[j] = static_cast<Acc>(Bs[k * kLd + tx + kStride * j]);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

// dst[k][c] = scale * src[k * ld + c] for k < rows, c < cols; zero elsewhere (k < kSlice,
// c < kTile). The source slice is row-major with the tile index contiguous. NT = blockDim.x.
template <int NT, typename S, typename T>
__device__ __forceinline__ void load_slice(S* __restrict__ dst, const T* __restrict__ src,
                                           int64_t ld, int rows, int cols, S scale = S(1)) {
  static_assert((kSlice * kTile) % NT == 0, "the slice must split evenly over the threads");
#pragma unroll 4
  for (int u = 0; u < kSlice * kTile / NT; ++u) {
    const int e = threadIdx.x + u * NT;
    const int k = e / kTile, c = e % kTile;
    dst[k * kLd + c] =
        (k < rows && c < cols) ? scale * static_cast<S>(src[k * ld + c]) : S(0);
  }
}

// dst[k][c] = src[c * ld + k] for k < rows, c < cols; zero elsewhere: the transposed slice of a
// row-major source whose contiguous index is k (consecutive threads read consecutive k).
template <int NT, typename S, typename T>
__device__ __forceinline__ void load_slice_t(S* __restrict__ dst, const T* __restrict__ src,
                                             int64_t ld, int rows, int cols) {
  static_assert((kSlice * kTile) % NT == 0, "the slice must split evenly over the threads");
#pragma unroll 4
  for (int u = 0; u < kSlice * kTile / NT; ++u) {
    const int e = threadIdx.x + u * NT;
    const int k = e % kSlice, c = e / kSlice;
    dst[k * kLd + c] = (k < rows && c < cols) ? static_cast<S>(src[c * ld + k]) : S(0);
  }
}

// ---- host side --------------------------------------------------------------------------

// Largest block of a host layout table [num_blocks, 3].
inline int64_t max_block_size(const int64_t* layout_host, int64_t num_blocks) {
  int64_t s = 0;
  for (int64_t b = 0; b < num_blocks; ++b) s = std::max(s, layout_host[3 * b + 1]);
  return s;
}

// Extent of the flat vector covered by the layout (the width of [kTile, d] workspaces).
inline int64_t layout_extent(const int64_t* layout_host, int64_t num_blocks) {
  int64_t d = 0;
  for (int64_t b = 0; b < num_blocks; ++b)
    d = std::max(d, layout_host[3 * b] + layout_host[3 * b + 1]);
  return d;
}

inline unsigned grid_dim(int64_t n, const char* what, int64_t limit = 65535) {
  if (n > limit)
    throw std::invalid_argument(std::string("ssse_ext CUDA: ") + what + " = " +
                                std::to_string(n) + " exceeds the grid limit " +
                                std::to_string(limit));
  return static_cast<unsigned>(std::max<int64_t>(n, 1));
}

// Bytes a workspace section takes, rounded up so that every section starts 256-byte aligned.
inline size_t section_bytes(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Kernels whose shared memory exceeds the 48 KiB static limit opt in before every launch
// (cheap, no synchronisation, and correct for whichever device is current).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  SSSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

}  // namespace ssse::cuda::detail
