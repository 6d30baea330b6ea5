// CUDA twin of csrc/cpu/dual.h: low-rank ("dual") blocks of the inverse Fisher,
//   F_b^{-1} = (1/damping) [I - G_b^T K_b^{-1} G_b],   K_b = damping N I_R + G_b G_b^T = L_b L_b^T,
// stored as G_b (input dtype) and L_b (float64); see DualSpec in common.h. Same arguments as the
// CPU entry points plus the host copy of the table, the device workspace and the stream; every
// entry point runs on `stream` without host synchronisation.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssse::cuda {

// Rows [r0, r0 + m) in: G_b[r0 + i, :] = grads[i, start_b : start_b + size_b], then
// L_b[i, j] = G_b[i, :] . G_b[j, :] (float64) for r0 <= i < r0 + m, j <= i. Products are staged
// tile by tile in shared memory as float64 (float32 products are exact there).
template <typename T>
void dual_gram(const T* grads,              // device [m, d] row-major
               int64_t m, int64_t d,
               const int64_t* table_host,   // host [num_blocks, 4]: start, size, g/l offsets
               const int64_t* table_dev,    // the same table on the device
               int64_t num_blocks, int64_t r0,
               T* g,                        // device, packed G storage
               double* l,                   // device, packed factor storage
               int64_t ldl, cudaStream_t stream);

// Bytes of the device workspace dual_cholesky needs.
size_t dual_cholesky_workspace_bytes(int64_t num_blocks);

// Extends every factor from rows [0, r0) to rows [0, r1) (see csrc/cpu/dual.h for the two
// modes): a right-looking blocked Cholesky over the strip of rows [r0, r1) with 64-wide tiles,
// one step per column tile (old columns: panel solve with the stored factor; new columns: the
// diagonal tile's Cholesky in shared memory, then the panel solve), each step followed by the
// GEMM update of the strip's remaining tiles. info[b] = 0 or the potrf-convention row.
void dual_cholesky(double* l,                   // device, packed factor storage
                   const int64_t* table_host,   // host [num_blocks, 4]
                   const int64_t* table_dev,    // device [num_blocks, 4]
                   int64_t num_blocks, int64_t r0, int64_t r1, int64_t ldl, double shift,
                   bool strip_solved,
                   int64_t* info,               // device [num_blocks]
                   void* work, size_t work_bytes, cudaStream_t stream);

// Bytes of the device workspace dual_apply needs for r right-hand sides.
size_t dual_apply_workspace_bytes(int64_t num_blocks, int64_t rows, int64_t r);

// out_b = base_b + (scale / damping) (v_b - G_b^T L_b^{-T} L_b^{-1} G_b v_b): W = G_b v_b (a warp
// per row of G_b), the two triangular solves blocked by 64-row tiles (one launch per tile step:
// every tile below subtracts the finished tile's contribution, and the next tile's diagonal
// solve runs on one warp per right-hand side), then G_b^T Z with the final combination (a thread
// per column of G_b). Rows of out outside the dual blocks are not touched.
template <typename T>
void dual_apply(const T* g,                   // device, packed G storage
                const double* l,              // device, packed factor storage
                const int64_t* table_host,    // host [num_blocks, 4]
                const int64_t* table_dev,     // device [num_blocks, 4]
                int64_t num_blocks, int64_t rows, int64_t ldl, double damping,
                const T* v,                   // device [d, r] row-major
                int64_t d, int64_t r,
                const T* base,                // device [d, r] or nullptr
                double scale,
                T* out,                       // device [d, r]; may alias base
                void* work, size_t work_bytes, cudaStream_t stream);

// Bytes of the device workspace dual_remove_rows needs.
size_t dual_remove_rows_workspace_bytes(int64_t num_blocks, int64_t rows, int64_t k,
                                        int64_t first);

// Deletes k stored rows of every block (keep/removed as on the CPU). The factor is recomputed
// from row `first` on (first <= every block's first removed row): rows [0, first) of L_b are
// unchanged, L'[first:, :first] = L[keep[first:], :first], and with T = L[keep[first:], first:]
// the trailing factor is chol(T T^T), in float64 (a refactor, O(R^3) flops, all in parallel
// GEMM-shaped kernels, where the CPU's sequential rank-1 updates would be slow on a GPU).
template <typename T>
void dual_remove_rows(T* g,                        // device, packed G storage
                      double* l,                   // device, packed factor storage
                      const int64_t* table_host,   // host [num_blocks, 4]
                      const int64_t* table_dev,    // device [num_blocks, 4]
                      int64_t num_blocks, int64_t rows, int64_t ldl,
                      const int64_t* keep,         // device [num_blocks, rows - k], ascending
                      const int64_t* removed,      // device [num_blocks, k], ascending
                      int64_t k, int64_t first,
                      int64_t* info,               // device [num_blocks]
                      void* work, size_t work_bytes, cudaStream_t stream);

}  // namespace ssse::cuda
