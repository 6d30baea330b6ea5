#include "dense.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "microkernel.h"

namespace ssse::cpu {

template <typename TA, typename TB>
void gemm(int64_t M, int64_t N, int64_t K, double alpha, const TA* a, int64_t a_rs, int64_t a_cs,
          const TB* b, int64_t b_rs, int64_t b_cs, double beta, double* c, int64_t ldc,
          bool lower_only) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<TA, float> && std::is_same_v<TB, float>)
    mk.gemm_ff(M, N, K, alpha, a, a_rs, a_cs, b, b_rs, b_cs, beta, c, ldc, lower_only);
  else if constexpr (std::is_same_v<TA, double> && std::is_same_v<TB, double>)
    mk.gemm_dd(M, N, K, alpha, a, a_rs, a_cs, b, b_rs, b_cs, beta, c, ldc, lower_only);
  else if constexpr (std::is_same_v<TA, float>)
    mk.gemm_fd(M, N, K, alpha, a, a_rs, a_cs, b, b_rs, b_cs, beta, c, ldc, lower_only);
  else
    mk.gemm_df(M, N, K, alpha, a, a_rs, a_cs, b, b_rs, b_cs, beta, c, ldc, lower_only);
}

template void gemm<float, float>(int64_t, int64_t, int64_t, double, const float*, int64_t, int64_t,
                                 const float*, int64_t, int64_t, double, double*, int64_t, bool);
template void gemm<double, double>(int64_t, int64_t, int64_t, double, const double*, int64_t,
                                   int64_t, const double*, int64_t, int64_t, double, double*,
                                   int64_t, bool);
template void gemm<float, double>(int64_t, int64_t, int64_t, double, const float*, int64_t, int64_t,
                                  const double*, int64_t, int64_t, double, double*, int64_t, bool);
template void gemm<double, float>(int64_t, int64_t, int64_t, double, const double*, int64_t,
                                  int64_t, const float*, int64_t, int64_t, double, double*, int64_t,
                                  bool);

template <typename TA>
void gemm_symmetric_b(int64_t M, int64_t N, double alpha, const TA* a, int64_t a_rs, int64_t a_cs,
                      const double* s, int64_t lds, double beta, double* c, int64_t ldc) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<TA, float>)
    mk.gemm_symmetric_f(M, N, alpha, a, a_rs, a_cs, s, lds, beta, c, ldc);
  else
    mk.gemm_symmetric_d(M, N, alpha, a, a_rs, a_cs, s, lds, beta, c, ldc);
}

template void gemm_symmetric_b<float>(int64_t, int64_t, double, const float*, int64_t, int64_t,
                                      const double*, int64_t, double, double*, int64_t);
template void gemm_symmetric_b<double>(int64_t, int64_t, double, const double*, int64_t, int64_t,
                                       const double*, int64_t, double, double*, int64_t);

template <typename T>
double dot(const T* a, const double* b, int64_t n) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<T, float>)
    return mk.dot_f(a, b, n);
  else
    return mk.dot_d(a, b, n);
}

template double dot<float>(const float*, const double*, int64_t);
template double dot<double>(const double*, const double*, int64_t);

template <typename T, typename V>
void rows_times(const T* f, int64_t rows, int64_t s, const V* v, int64_t r, double* out,
                int64_t ldf) {
  std::vector<double> vt(static_cast<size_t>(r * s));  // v^T: [r, s] in float64
  for (int64_t j = 0; j < s; ++j)
    for (int64_t c = 0; c < r; ++c)
      vt[static_cast<size_t>(c * s + j)] = static_cast<double>(v[j * r + c]);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < r; ++c) out[i * r + c] = dot(f + i * ldf, vt.data() + c * s, s);
}

template void rows_times<float, float>(const float*, int64_t, int64_t, const float*, int64_t,
                                       double*, int64_t);
template void rows_times<double, double>(const double*, int64_t, int64_t, const double*, int64_t,
                                         double*, int64_t);
template void rows_times<float, double>(const float*, int64_t, int64_t, const double*, int64_t,
                                        double*, int64_t);

template <typename T>
void gemm_rows_b(int64_t M, int64_t N, int64_t K, const double* a, int64_t a_rs, int64_t a_cs,
                 const T* b, int64_t ldb, double* c, int64_t ldc) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<T, float>)
    mk.gemm_rows_f(M, N, K, a, a_rs, a_cs, b, ldb, c, ldc);
  else
    mk.gemm_rows_d(M, N, K, a, a_rs, a_cs, b, ldb, c, ldc);
}

template void gemm_rows_b<float>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                 const float*, int64_t, double*, int64_t);
template void gemm_rows_b<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                  const double*, int64_t, double*, int64_t);

template <typename T>
bool rank_update(int64_t s, int64_t k, const double* wt, double coef, T* f, int64_t ldf) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<T, float>)
    return mk.rank_update_f(s, k, wt, coef, f, ldf);
  else
    return mk.rank_update_d(s, k, wt, coef, f, ldf);
}

template bool rank_update<float>(int64_t, int64_t, const double*, double, float*, int64_t);
template bool rank_update<double>(int64_t, int64_t, const double*, double, double*, int64_t);

template <typename T>
void gram_lower(int64_t s, int64_t j0, int64_t j1, int64_t K, const T* x, int64_t ldx, double* c,
                int64_t ldc) {
  const detail::MicroKernel& mk = detail::micro_kernel();
  if constexpr (std::is_same_v<T, float>)
    mk.gram_f(s, j0, j1, K, x, ldx, c, ldc);
  else
    mk.gram_d(s, j0, j1, K, x, ldx, c, ldc);
}

template void gram_lower<float>(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, double*,
                                int64_t);
template void gram_lower<double>(int64_t, int64_t, int64_t, int64_t, const double*, int64_t,
                                 double*, int64_t);

void trsm_left_lower(int64_t m, int64_t n, const double* l, int64_t ldl, double* x, int64_t ldx) {
  detail::micro_kernel().trsm_left_lower(m, n, l, ldl, x, ldx);
}

void trsm_left_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                           int64_t ldx) {
  detail::micro_kernel().trsm_left_lower_trans(m, n, l, ldl, x, ldx);
}

void trsm_right_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                            int64_t ldx) {
  detail::micro_kernel().trsm_right_lower_trans(m, n, l, ldl, x, ldx);
}

int64_t potrf_lower(int64_t n, double* a, int64_t lda) {
  return detail::micro_kernel().potrf_lower(n, a, lda);
}

void symmetrize_from_lower(int64_t n, double* a, int64_t lda) {
  detail::micro_kernel().symmetrize_from_lower(n, a, lda);
}

int64_t spd_inverse(int64_t n, double* a, int64_t lda) {
  return detail::micro_kernel().spd_inverse(n, a, lda);
}

void parallel_for(int64_t count, int threads, const std::function<void(int64_t)>& fn) {
  if (count <= 0) return;
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(threads, count));
#ifdef _OPENMP
  // OpenMP, in torch's own runtime (torch loads libgomp first and the module reuses it): the
  // team is torch's, whose threads are already running or spinning after torch's last
  // parallel op. Threads of our own would compete with those spinning threads for the same
  // cores and ran no faster than one thread after any torch call. Only OpenMP 3.0 is used
  // (torch's libgomp predates 5.1); the schedule is dynamic through one atomic counter.
  if (nthreads > 1 && !omp_in_parallel()) {
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(nthreads))
    {
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= count) break;
        try {
          fn(i);
        } catch (...) {
#pragma omp critical(ssse_parallel_for_error)
          {
            if (!error) error = std::current_exception();
          }
          next.store(count);
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) fn(i);
}

}  // namespace ssse::cpu
