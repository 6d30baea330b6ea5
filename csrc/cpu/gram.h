// Stable build of the block inverse Fisher: stream gradient chunks into per-block Gram matrices
// (float64 accumulation), then F_b = damping I + gram_b / normalizer and its Cholesky inverse.
#pragma once
#include <cstdint>

namespace ssse::cpu {

// gram_b += X_b^T X_b for every block b, X_b = grads[:, start_b : start_b + size_b].
// Only the lower triangle of each gram block is accumulated.
template <typename T>
void gram_accumulate(const T* grads,        // [m, d] row-major
                     int64_t m, int64_t d,
                     const int64_t* layout,  // [num_blocks, 3] (start, size, offset)
                     int64_t num_blocks,
                     double* gram,           // packed: block b is [size_b, size_b] at offset_b
                     int threads);

// out_b = (damping I + gram_b / normalizer)^{-1}, written in full; gram is used as workspace
// (reads its lower triangle). info[b] = 0 on success, else the potrf code of block b (its
// out block is then left untouched).
template <typename T>
void inverse_from_gram(double* gram,           // packed [sum size_b^2]
                       const int64_t* layout,  // [num_blocks, 3]
                       int64_t num_blocks, double damping, double normalizer,
                       T* out,                 // packed [sum size_b^2]
                       int64_t* info,          // [num_blocks]
                       int threads);

// out_b += gram_b x_b for every block b: gram_b symmetric, read from its lower triangle only
// (as gram_accumulate leaves it); x and out [d, r] row-major, float64.
void gram_product(const double* gram,       // packed [sum size_b^2]
                  const int64_t* layout,    // [num_blocks, 3]
                  int64_t num_blocks, const double* x, int64_t r, double* out, int threads);

// sketch_b += sign R_b^T (R_b x_b) for every block b of the table, R_b = rows[:, start_b :
// start_b + size_b] (the rows in their own dtype, read twice, never copied); x and sketch [d, r]
// row-major float64.
template <typename T>
void rows_product(const T* rows, int64_t m, int64_t d, const int64_t* layout, int64_t num_blocks,
                  const double* x, int64_t r, double sign, double* sketch, int threads);

}  // namespace ssse::cpu
