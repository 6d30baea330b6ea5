// The dense linear algebra of the CPU kernels (see dense.h: GEMM, Gram panels, triangular solves,
// Cholesky factorisation and inverse), compiled once per instruction set and chosen at run time,
// so that default builds need no -march flag and still use AVX2/AVX-512 where present. Each
// instruction set compiles everything, not only the register-blocked micro-kernel: the packing
// (with its float32 -> float64 conversions), the edge tiles and the unblocked leaves of the
// recursive factorisations are vectorised for that target too.
#pragma once
#include <cstdint>

namespace ssse::cpu::detail {

// C[M, N] (ldc) = beta C + alpha A B with A(i, k) = a[i a_rs + k a_cs], B(k, j) = b[k b_rs +
// j b_cs]; lower_only: only entries with i >= j are computed and written. See dense.h.
template <typename TA, typename TB>
using GemmFn = void (*)(int64_t M, int64_t N, int64_t K, double alpha, const TA* a, int64_t a_rs,
                        int64_t a_cs, const TB* b, int64_t b_rs, int64_t b_cs, double beta,
                        double* c, int64_t ldc, bool lower_only);

// C(i, j) += sum_k X(k, i) X(k, j) for j0 <= j < j1 and j <= i < s (a lower column panel of a
// Gram matrix), X(k, i) = x[k ldx + i] for k < K, i < s; C row-major with leading dimension ldc.
template <typename T>
using GramFn = void (*)(int64_t s, int64_t j0, int64_t j1, int64_t K, const T* x, int64_t ldx,
                        double* c, int64_t ldc);

// C[M, N] (ldc) = beta C + alpha A S, S symmetric [N, N] held in its lower triangle (s, lds).
template <typename TA>
using GemmSymmetricFn = void (*)(int64_t M, int64_t N, double alpha, const TA* a, int64_t a_rs,
                                 int64_t a_cs, const double* s, int64_t lds, double beta,
                                 double* c, int64_t ldc);

// C[M, N] (ldc) = A B with A (float64) as in GemmFn and B row-major [K, N] (b, ldb), read in place.
template <typename T>
using GemmRowsFn = void (*)(int64_t M, int64_t N, int64_t K, const double* a, int64_t a_rs,
                            int64_t a_cs, const T* b, int64_t ldb, double* c, int64_t ldc);

// F[s, s] (ldf) += coef W W^T with W(i, k) = wt[k s + i]; false: not done (too many rows k).
template <typename T>
using RankUpdateFn = bool (*)(int64_t s, int64_t k, const double* wt, double coef, T* f,
                              int64_t ldf);

// X[m, n] := op(L)^{-1} X or X op(L)^{-1} for a lower triangular L (see dense.h).
using TrsmFn = void (*)(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                        int64_t ldx);

struct MicroKernel {
  int mr;           // rows of the register tile
  int nr;           // columns of the register tile
  const char* isa;  // "generic", "avx2" or "avx512"
  GemmFn<float, float> gemm_ff;
  GemmFn<double, double> gemm_dd;
  GemmFn<float, double> gemm_fd;
  GemmFn<double, float> gemm_df;
  GemmSymmetricFn<float> gemm_symmetric_f;
  GemmSymmetricFn<double> gemm_symmetric_d;
  GramFn<float> gram_f;
  GramFn<double> gram_d;
  int64_t (*potrf_lower)(int64_t n, double* a, int64_t lda);
  int64_t (*spd_inverse)(int64_t n, double* a, int64_t lda);
  TrsmFn trsm_left_lower;
  TrsmFn trsm_left_lower_trans;
  TrsmFn trsm_right_lower_trans;
  void (*symmetrize_from_lower)(int64_t n, double* a, int64_t lda);
  double (*dot_f)(const float* a, const double* b, int64_t n);
  double (*dot_d)(const double* a, const double* b, int64_t n);
  GemmRowsFn<float> gemm_rows_f;
  GemmRowsFn<double> gemm_rows_d;
  RankUpdateFn<float> rank_update_f;
  RankUpdateFn<double> rank_update_d;
};

// The best kernel set for the running CPU (decided once; SSSE_CPU_ISA=generic|avx2|avx512
// forces one the CPU supports).
const MicroKernel& micro_kernel();

extern const MicroKernel kMicroKernelGeneric;
#if defined(__x86_64__) || defined(_M_X64)
extern const MicroKernel kMicroKernelAvx2;
extern const MicroKernel kMicroKernelAvx512;
#endif

}  // namespace ssse::cpu::detail
