// Single-threaded dense linear algebra in float64 used by the CPU kernels: a packed, cache-blocked
// GEMM over strided (and possibly float32) operands, the lower part of a Gram matrix, recursive
// triangular solves, Cholesky factorisation and the Cholesky-based inverse of a symmetric positive
// definite matrix. Callers parallelise over blocks. Each function runs the implementation of the
// instruction set chosen at run time (microkernel.h: generic, AVX2 or AVX-512).
#pragma once
#include <cstdint>
#include <exception>
#include <functional>

namespace ssse::cpu {

// C[M, N] (row-major, leading dimension ldc) = beta * C + alpha * A B, where
// A(i, k) = a[i * a_rs + k * a_cs] and B(k, j) = b[k * b_rs + j * b_cs] (any strides, so
// transposes and sub-blocks need no copies). beta == 0 overwrites C without reading it.
// lower_only: only entries with i >= j are computed and written (symmetric rank-k updates).
template <typename TA, typename TB>
void gemm(int64_t M, int64_t N, int64_t K, double alpha, const TA* a, int64_t a_rs, int64_t a_cs,
          const TB* b, int64_t b_rs, int64_t b_cs, double beta, double* c, int64_t ldc,
          bool lower_only = false);

// C[M, N] (ldc) = beta C + alpha A S with A as in gemm and S symmetric [N, N], read from its
// lower triangle only (s, lds): its upper triangle may hold anything.
template <typename TA>
void gemm_symmetric_b(int64_t M, int64_t N, double alpha, const TA* a, int64_t a_rs, int64_t a_cs,
                      const double* s, int64_t lds, double beta, double* c, int64_t ldc);

// C(i, j) += sum_k X(k, i) X(k, j) for j0 <= j < j1 and j <= i < s: the lower part of columns
// [j0, j1) of the Gram matrix X^T X, X(k, i) = x[k ldx + i] (K x s), C row-major (ldc). Every
// element of X is read once, converted to float64 once per pass, and serves as both operands.
template <typename T>
void gram_lower(int64_t s, int64_t j0, int64_t j1, int64_t K, const T* x, int64_t ldx, double* c,
                int64_t ldc);

// sum_i a[i] b[i] in float64 (vectorised for the running CPU; the order of the sums depends on
// its vector width, as the GEMM's do).
template <typename T>
double dot(const T* a, const double* b, int64_t n);

// out[i * r + c] = sum_j f[i * ldf + j] v[j * r + c] for i < rows (rows of a block times r
// vectors v [s, r], row-major), in float64 by dot products: for few vectors, where a packed
// GEMM would waste its register tile. V is T or double.
template <typename T, typename V = T>
void rows_times(const T* f, int64_t rows, int64_t s, const V* v, int64_t r, double* out,
                int64_t ldf);
template <typename T>
void rows_times(const T* f, int64_t rows, int64_t s, const T* v, int64_t r, double* out) {
  rows_times<T, T>(f, rows, s, v, r, out, s);
}

// C[M, N] (ldc) = A B with A(i, k) = a[i * a_rs + k * a_cs] (float64) and B row-major [K, N]
// (b, ldb) read in place, converted to float64 as it is loaded (no packed copy of B): a few rows
// times a whole block, where packing the block would cost as much as the product.
template <typename T>
void gemm_rows_b(int64_t M, int64_t N, int64_t K, const double* a, int64_t a_rs, int64_t a_cs,
                 const T* b, int64_t ldb, double* c, int64_t ldc);

// F[s, s] (ldf) += coef W W^T with W(i, k) = wt[k * s + i] (wt: [k, s] float64), in one pass
// over F, each element updated in float64 and rounded once to T; a symmetric F stays bitwise
// symmetric. Returns false, doing nothing, when k is too large for its packed copies of W
// (2 s k doubles above 8 MiB): the caller then tiles the product itself.
template <typename T>
bool rank_update(int64_t s, int64_t k, const double* wt, double coef, T* f, int64_t ldf);

// In-place lower Cholesky factor of the SPD matrix a[n, n] (lda): reads and writes the lower
// triangle only. Returns 0 on success, else j + 1 where the leading minor of order j + 1 is not
// positive definite (LAPACK's convention).
int64_t potrf_lower(int64_t n, double* a, int64_t lda);

// In-place inverse of the SPD matrix whose lower triangle is in a[n, n] (lda), written in full
// (both triangles). Returns the potrf code (0 on success; a is then garbage otherwise).
int64_t spd_inverse(int64_t n, double* a, int64_t lda);

// X[m, n] (ldx) := L^{-1} X, L lower triangular [m, m] (ldl), non-unit diagonal.
void trsm_left_lower(int64_t m, int64_t n, const double* l, int64_t ldl, double* x, int64_t ldx);

// X[m, n] (ldx) := L^{-T} X, L lower triangular [m, m] (ldl), non-unit diagonal.
void trsm_left_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                           int64_t ldx);

// X[m, n] (ldx) := X L^{-T}, L lower triangular [n, n] (ldl), non-unit diagonal (recursive,
// GEMM-rich: the off-diagonal panel of a Cholesky factor).
void trsm_right_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                            int64_t ldx);

// Mirrors the lower triangle of a[n, n] onto the upper one.
void symmetrize_from_lower(int64_t n, double* a, int64_t lda);

// Runs fn(i) for i in [0, count) on up to `threads` OpenMP threads (dynamic scheduling; serial
// inside another parallel region or without OpenMP); the first exception thrown by any call
// is rethrown in the caller after all threads are done.
void parallel_for(int64_t count, int threads, const std::function<void(int64_t)>& fn);

}  // namespace ssse::cpu
