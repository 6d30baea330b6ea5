// Low-rank ("dual") blocks of the inverse Fisher: for a block of size s with R < s gradient rows
// G_b (R x s), F_b = damping I + G_b^T G_b / N has the exact inverse
//   F_b^{-1} = (1/damping) [I - G_b^T K_b^{-1} G_b],   K_b = damping N I_R + G_b G_b^T = L_b L_b^T,
// stored as G_b (input dtype) and L_b (float64); see DualSpec in common.h for the storage.
// The CUDA twins (csrc/cuda/dual.cuh) take the same arguments plus device tables, workspace and
// stream.
#pragma once
#include <cstdint>

namespace ssse::cpu {

// Streams gradient rows [r0, r0 + m) in: G_b[r0 + i, :] = grads[i, start_b : start_b + size_b],
// then the new rows of the raw Gram matrix, L_b[i, j] = G_b[i, :] . G_b[j, :] for
// r0 <= i < r0 + m and j <= i (float64 products and sums; float32 rows are converted tile by
// tile inside the GEMM's packing, never as a whole chunk). r0 + m <= ldl.
template <typename T>
void dual_gram(const T* grads,        // [m, d] row-major
               int64_t m, int64_t d,
               const int64_t* table,  // [num_blocks, 4] (start, size, g_offset, l_offset)
               int64_t num_blocks, int64_t r0,
               T* g,                  // packed G storage: block b is [ldl, size_b] at g_offset_b
               double* l,             // packed factor storage: block b is [ldl, ldl] at l_offset_b
               int64_t ldl, int threads);

// Extends every factor from rows [0, r0) to rows [0, r1), in float64. On entry rows [r0, r1)
// of L_b hold, in their lower part:
//   strip_solved = false: the new rows of the raw Gram matrix (dual_gram's output); then
//     L21 = K21 L11^{-T},  S = K22 + shift I - L21 L21^T,  L22 = chol(S);
//   strip_solved = true: L21 already in columns [0, r0) and S - shift I in columns [r0, r1);
//     then only L22 = chol(S + shift I) (the downdate's refactor).
// r0 = 0 is a plain Cholesky factorisation of K = Gram + shift I. info[b] = 0, or the 1-based
// row (LAPACK's potrf convention, counted from row 0 of K) at which K_b is not positive
// definite; rows [0, r0) are never written.
void dual_cholesky(double* l,             // packed factor storage
                   const int64_t* table,  // [num_blocks, 4]
                   int64_t num_blocks, int64_t r0, int64_t r1, int64_t ldl, double shift,
                   bool strip_solved,
                   int64_t* info,         // [num_blocks]
                   int threads);

// out_b = base_b + (scale / damping) (v_b - G_b^T L_b^{-T} L_b^{-1} G_b v_b) for every dual
// block, v_b = v[start_b : start_b + size_b, :]: two GEMVs (GEMMs for r > 1) over G_b and two
// triangular solves with L_b, fused over blocks; float64 arithmetic. Rows of out outside the
// dual blocks are not touched.
template <typename T>
void dual_apply(const T* g,             // packed G storage
                const double* l,        // packed factor storage
                const int64_t* table,   // [num_blocks, 4]
                int64_t num_blocks, int64_t rows, int64_t ldl, double damping,
                const T* v,             // [d, r] row-major
                int64_t d, int64_t r,
                const T* base,          // [d, r] row-major, or nullptr for zero
                double scale,
                T* out,                 // [d, r] row-major; may alias base
                int threads);

// Deletes k stored rows of every block: G_b keeps rows keep_b (ascending) in order, and L_b
// becomes the Cholesky factor of K_b[keep_b, keep_b]. CPU: Cholesky *updates* (Givens
// rotations, never a hyperbolic downdate): with A = L_b[keep_b, :], A A^T = K_b[keep_b, keep_b]
// = L_b[keep, keep] L_b[keep, keep]^T + sum over removed c of L_b[keep, c] L_b[keep, c]^T, so the
// lower triangular L_b[keep, keep] takes k stable rank-1 updates, O(k R^2) flops, in place.
// `first` <= every block's first removed row (the CUDA kernel refactors from there).
template <typename T>
void dual_remove_rows(T* g,                    // packed G storage
                      double* l,               // packed factor storage
                      const int64_t* table,    // [num_blocks, 4]
                      int64_t num_blocks, int64_t rows, int64_t ldl,
                      const int64_t* keep,     // [num_blocks, rows - k], ascending per block
                      const int64_t* removed,  // [num_blocks, k], ascending per block
                      int64_t k, int64_t first,
                      int64_t* info,           // [num_blocks], set to 0 (the updates cannot fail)
                      int threads);

}  // namespace ssse::cpu
