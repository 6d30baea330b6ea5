// A Woodbury change of dense block inverses (F_b^{-1} -> (F_b + sign R_b^T R_b / N)^{-1}) in two
// passes that read the blocks in their own dtype, in float64 arithmetic: woodbury_check reads
// every block once and keeps, per block, W_b^T = L_b^{-1} U_b^T with U_b = F_b^{-1} R_b^T and
// C_b = N I_k + sign R_b U_b = L_b L_b^T, and C_b's pivots, changing nothing; woodbury_write then
// writes F_b^{-1} - sign W_b W_b^T, rounded once to the blocks' dtype and kept bitwise symmetric.
// A caller checks every pivot first and writes only when all pass, so a refused change leaves
// every block as it was.
#pragma once
#include <cstdint>

namespace ssse::cpu {

// wt: float64, block b's W_b^T [k, size_b] at k * (size_0 + ... + size_{b-1}) (table order).
// pivots [num_blocks, k]: (L_b)_ii^2 / N (zero where the factorisation failed). info[b] = 0, the
// potrf code of C_b when it is not positive definite, or -1 when C_b is not finite (the rows'
// products overflowed float64).
//
// With r > 0 vectors V [d, r] (row-major, the inverse's dtype), the same pass also writes, for
// every block that passes, out[start_b - out_start + i, j] (float64, row-major, its first row
// row out_start of V: the rows of the table's blocks; other rows untouched)
// = (F_b^{-1} V_b)(i, j) where changed is false, or ((F_b + sign R_b^T R_b / N)^{-1} V_b)(i, j)
// = (F_b^{-1} V_b - sign W_b W_b^T V_b)(i, j) where it is true: the block is read once for both.
// The rows are in the blocks' dtype R = T, or float32 (R) for float64 blocks (T).
template <typename T, typename R = T>
void woodbury_check(const T* inv,           // packed [sum size_b^2], full symmetric blocks
                    const int64_t* layout,  // [num_blocks, 3] (start, size, offset)
                    int64_t num_blocks,
                    const R* rows,          // [k, d] row-major
                    int64_t k, int64_t d, double normalizer, int sign, double* wt,
                    double* pivots, int64_t* info, int threads, const T* vecs = nullptr,
                    int64_t r = 0, bool changed = false, double* out = nullptr,
                    int64_t out_start = 0);

// F_b^{-1} -= sign W_b W_b^T for every block, from woodbury_check's wt.
template <typename T>
void woodbury_write(T* inv, const int64_t* layout, int64_t num_blocks, const double* wt,
                    int64_t k, int sign, int threads);

}  // namespace ssse::cpu
