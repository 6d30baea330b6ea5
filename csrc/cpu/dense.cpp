#include "dense.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "microkernel.h"

namespace ssse::cpu {

namespace {

// Cache blocking: an MC x KC panel of A (~200 KB) stays in L2, a KC x NC panel of B in L3.
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 96;
constexpr int64_t kNC = 2304;

// Packs A(ic:ic+mc, pc:pc+kc) into row panels of height mr: [ceil(mc/mr)][kc][mr], zero-padded.
template <typename T>
void pack_a(int64_t mc, int64_t kc, const T* a, int64_t rs, int64_t cs, int mr, double* out) {
  for (int64_t i0 = 0; i0 < mc; i0 += mr) {
    const int64_t h = std::min<int64_t>(mr, mc - i0);
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = a + i0 * rs + k * cs;
      int64_t i = 0;
      for (; i < h; ++i) out[i] = static_cast<double>(src[i * rs]);
      for (; i < mr; ++i) out[i] = 0.0;
      out += mr;
    }
  }
}

// Packs B(pc:pc+kc, jc:jc+nc) into column panels of width nr: [ceil(nc/nr)][kc][nr], zero-padded.
template <typename T>
void pack_b(int64_t kc, int64_t nc, const T* b, int64_t rs, int64_t cs, int nr, double* out) {
  for (int64_t j0 = 0; j0 < nc; j0 += nr) {
    const int64_t w = std::min<int64_t>(nr, nc - j0);
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = b + k * rs + j0 * cs;
      int64_t j = 0;
      if (cs == 1) {
        for (; j < w; ++j) out[j] = static_cast<double>(src[j]);
      } else {
        for (; j < w; ++j) out[j] = static_cast<double>(src[j * cs]);
      }
      for (; j < nr; ++j) out[j] = 0.0;
      out += nr;
    }
  }
}

// Per-thread packing buffers, grown on demand and never zero-filled (every element used is
// written by the packing routines first).
struct Scratch {
  std::unique_ptr<double[]> data;
  size_t size = 0;
  double* get(size_t n) {
    if (size < n) {
      data.reset(new double[n]);
      size = n;
    }
    return data.get();
  }
};
thread_local Scratch tl_pack_a;
thread_local Scratch tl_pack_b;

}  // namespace

template <typename TA, typename TB>
void gemm(int64_t M, int64_t N, int64_t K, double alpha, const TA* a, int64_t a_rs, int64_t a_cs,
          const TB* b, int64_t b_rs, int64_t b_cs, double beta, double* c, int64_t ldc,
          bool lower_only) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == 0.0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < (lower_only ? std::min(i + 1, N) : N); ++j)
        c[i * ldc + j] = beta == 0.0 ? 0.0 : beta * c[i * ldc + j];
    return;
  }
  const detail::MicroKernel& mk = detail::micro_kernel();
  const int mr = mk.mr, nr = mk.nr;
  const int64_t mc_max = (kMC + mr - 1) / mr * mr;
  const int64_t nc_max = (kNC + nr - 1) / nr * nr;
  // Only as much as this call needs: small GEMMs (recursion leaves, narrow panels) stay cheap.
  const int64_t kc_need = std::min(kKC, K);
  const int64_t mc_need = std::min(mc_max, (M + mr - 1) / mr * mr);
  const int64_t nc_need = std::min(nc_max, (N + nr - 1) / nr * nr);
  double* ap = tl_pack_a.get(static_cast<size_t>(mc_need * kc_need));
  double* bp = tl_pack_b.get(static_cast<size_t>(nc_need * kc_need));
  double acc[8 * 24];  // large enough for every micro-kernel shape

  for (int64_t jc = 0; jc < N; jc += nc_max) {
    const int64_t nc = std::min(nc_max, N - jc);
    // Rows above the diagonal of this column range do not exist in lower_only mode.
    const int64_t i_begin = lower_only ? std::min<int64_t>(jc, M) : 0;
    for (int64_t pc = 0; pc < K; pc += kKC) {
      const int64_t kc = std::min(kKC, K - pc);
      const bool first = pc == 0;
      pack_b(kc, nc, b + pc * b_rs + jc * b_cs, b_rs, b_cs, nr, bp);
      for (int64_t ic = i_begin; ic < M; ic += mc_max) {
        const int64_t mc = std::min(mc_max, M - ic);
        pack_a(mc, kc, a + ic * a_rs + pc * a_cs, a_rs, a_cs, mr, ap);
        for (int64_t jr = 0; jr < nc; jr += nr) {
          const int64_t w = std::min<int64_t>(nr, nc - jr);
          const int64_t j_abs = jc + jr;
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int64_t h = std::min<int64_t>(mr, mc - ir);
            const int64_t i_abs = ic + ir;
            if (lower_only && i_abs + h - 1 < j_abs) continue;  // tile strictly above diagonal
            mk.fn(kc, ap + ir * kc, bp + jr * kc, acc);
            for (int64_t i = 0; i < h; ++i) {
              double* crow = c + (i_abs + i) * ldc + j_abs;
              const double* arow = acc + i * nr;
              const int64_t jend = lower_only ? std::min<int64_t>(w, i_abs + i - j_abs + 1) : w;
              if (first) {
                if (beta == 0.0) {
                  for (int64_t j = 0; j < jend; ++j) crow[j] = alpha * arow[j];
                } else {
                  for (int64_t j = 0; j < jend; ++j) crow[j] = beta * crow[j] + alpha * arow[j];
                }
              } else {
                for (int64_t j = 0; j < jend; ++j) crow[j] += alpha * arow[j];
              }
            }
          }
        }
      }
    }
  }
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

void trsm_left_lower(int64_t m, int64_t n, const double* l, int64_t ldl, double* x, int64_t ldx) {
  for (int64_t i = 0; i < m; ++i) {
    double* xi = x + i * ldx;
    for (int64_t k = 0; k < i; ++k) {
      const double f = l[i * ldl + k];
      if (f == 0.0) continue;
      const double* xk = x + k * ldx;
      for (int64_t j = 0; j < n; ++j) xi[j] -= f * xk[j];
    }
    const double inv = 1.0 / l[i * ldl + i];
    for (int64_t j = 0; j < n; ++j) xi[j] *= inv;
  }
}

void trsm_left_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                           int64_t ldx) {
  // Backward substitution on L^T X = B, one row of L at a time (contiguous reads): once x_i is
  // final, its contribution L(i, k) x_i leaves every earlier row k < i.
  for (int64_t i = m - 1; i >= 0; --i) {
    double* xi = x + i * ldx;
    const double* li = l + i * ldl;
    const double inv = 1.0 / li[i];
    for (int64_t j = 0; j < n; ++j) xi[j] *= inv;
    for (int64_t k = 0; k < i; ++k) {
      const double f = li[k];
      if (f == 0.0) continue;
      double* xk = x + k * ldx;
      for (int64_t j = 0; j < n; ++j) xk[j] -= f * xi[j];
    }
  }
}

namespace {

constexpr int64_t kBase = 48;  // below this size the recursive routines run unblocked loops

}  // namespace

// X[m, n] := X L^{-T} with L lower [n, n]: solves X L^T = B column block by column block.
void trsm_right_lower_trans(int64_t m, int64_t n, const double* l, int64_t ldl, double* x,
                            int64_t ldx) {
  if (n <= kBase) {
    for (int64_t r = 0; r < m; ++r) {
      double* xr = x + r * ldx;
      for (int64_t j = 0; j < n; ++j) {
        const double* lj = l + j * ldl;
        double s = xr[j];
        for (int64_t k = 0; k < j; ++k) s -= xr[k] * lj[k];
        xr[j] = s / lj[j];
      }
    }
    return;
  }
  const int64_t n1 = n / 2, n2 = n - n1;
  trsm_right_lower_trans(m, n1, l, ldl, x, ldx);
  // X2 -= X1 L21^T, with L21 = L[n1:, :n1]
  gemm<double, double>(m, n2, n1, -1.0, x, ldx, 1, l + n1 * ldl, 1, ldl, 1.0, x + n1, ldx);
  trsm_right_lower_trans(m, n2, l + n1 * ldl + n1, ldl, x + n1, ldx);
}

namespace {

// X[m, n] := X M with M lower triangular [n, n] (only its lower triangle is read).
void trmm_right_lower(int64_t m, int64_t n, const double* mat, int64_t ldm, double* x,
                      int64_t ldx) {
  if (n <= kBase) {
    std::vector<double> row(static_cast<size_t>(n));
    for (int64_t r = 0; r < m; ++r) {
      double* xr = x + r * ldx;
      std::fill(row.begin(), row.end(), 0.0);
      for (int64_t k = 0; k < n; ++k) {  // row k of M contributes to columns j <= k
        const double xk = xr[k];
        const double* mk = mat + k * ldm;
        for (int64_t j = 0; j <= k; ++j) row[static_cast<size_t>(j)] += xk * mk[j];
      }
      std::copy(row.begin(), row.end(), xr);
    }
    return;
  }
  const int64_t n1 = n / 2, n2 = n - n1;
  trmm_right_lower(m, n1, mat, ldm, x, ldx);                                   // X1 := X1 Ma
  gemm<double, double>(m, n1, n2, 1.0, x + n1, ldx, 1, mat + n1 * ldm, ldm, 1, 1.0, x, ldx);
  trmm_right_lower(m, n2, mat + n1 * ldm + n1, ldm, x + n1, ldx);              // X2 := X2 Mc
}

// X[m, n] := M X with M lower triangular [m, m].
void trmm_left_lower(int64_t m, int64_t n, const double* mat, int64_t ldm, double* x,
                     int64_t ldx) {
  if (m <= kBase) {
    for (int64_t i = m - 1; i >= 0; --i) {  // rows above i are still the old ones
      double* xi = x + i * ldx;
      const double* mi = mat + i * ldm;
      for (int64_t j = 0; j < n; ++j) xi[j] *= mi[i];
      for (int64_t k = 0; k < i; ++k) {
        const double f = mi[k];
        const double* xk = x + k * ldx;
        for (int64_t j = 0; j < n; ++j) xi[j] += f * xk[j];
      }
    }
    return;
  }
  const int64_t m1 = m / 2, m2 = m - m1;
  double* x2 = x + m1 * ldx;
  trmm_left_lower(m2, n, mat + m1 * ldm + m1, ldm, x2, ldx);                   // X2 := Mc X2
  gemm<double, double>(m2, n, m1, 1.0, mat + m1 * ldm, ldm, 1, x, ldx, 1, 1.0, x2, ldx);
  trmm_left_lower(m1, n, mat, ldm, x, ldx);                                    // X1 := Ma X1
}

// X[m, n] := M^T X with M lower triangular [m, m].
void trmm_left_lower_trans(int64_t m, int64_t n, const double* mat, int64_t ldm, double* x,
                           int64_t ldx) {
  if (m <= kBase) {
    for (int64_t i = 0; i < m; ++i) {  // rows below i are still the old ones
      double* xi = x + i * ldx;
      const double d = mat[i * ldm + i];
      for (int64_t j = 0; j < n; ++j) xi[j] *= d;
      for (int64_t k = i + 1; k < m; ++k) {
        const double f = mat[k * ldm + i];
        const double* xk = x + k * ldx;
        for (int64_t j = 0; j < n; ++j) xi[j] += f * xk[j];
      }
    }
    return;
  }
  const int64_t m1 = m / 2, m2 = m - m1;
  double* x2 = x + m1 * ldx;
  trmm_left_lower_trans(m1, n, mat, ldm, x, ldx);                              // X1 := Ma^T X1
  gemm<double, double>(m1, n, m2, 1.0, mat + m1 * ldm, 1, ldm, x2, ldx, 1, 1.0, x, ldx);
  trmm_left_lower_trans(m2, n, mat + m1 * ldm + m1, ldm, x2, ldx);             // X2 := Mc^T X2
}

// In place L := L^{-1} for lower triangular L [n, n] (lower triangle only).
void trtri_lower(int64_t n, double* l, int64_t ldl) {
  if (n <= kBase) {
    for (int64_t j = 0; j < n; ++j) {
      l[j * ldl + j] = 1.0 / l[j * ldl + j];
      // column j of the inverse below the diagonal: x_i = -(sum_{k=j}^{i-1} L_ik x_k) / L_ii.
      // Row i's entries left of the diagonal are overwritten only after their last use.
      for (int64_t i = j + 1; i < n; ++i) {
        double s = 0.0;
        for (int64_t k = j; k < i; ++k) s += l[i * ldl + k] * l[k * ldl + j];
        l[i * ldl + j] = -s / l[i * ldl + i];
      }
    }
    return;
  }
  // [L11 0; L21 L22]^{-1} = [M11 0; -M22 L21 M11, M22]
  const int64_t n1 = n / 2, n2 = n - n1;
  double* l21 = l + n1 * ldl;
  double* l22 = l21 + n1;
  trtri_lower(n1, l, ldl);
  trtri_lower(n2, l22, ldl);
  trmm_right_lower(n2, n1, l, ldl, l21, ldl);
  trmm_left_lower(n2, n1, l22, ldl, l21, ldl);
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t j = 0; j < n1; ++j) l21[i * ldl + j] = -l21[i * ldl + j];
}

// In place lower(M^T M) for lower triangular M [n, n] (LAPACK's lauum, lower case).
void lauum_lower(int64_t n, double* a, int64_t lda) {
  if (n <= kBase) {
    // Row by row: C_ij (j <= i) reads rows k >= i of M, which are overwritten only later.
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        double s = 0.0;
        for (int64_t k = i; k < n; ++k) s += a[k * lda + i] * a[k * lda + j];
        a[i * lda + j] = s;
      }
    return;
  }
  // [M11 0; M21 M22]^T [M11 0; M21 M22] = [M11^T M11 + M21^T M21, .; M22^T M21, M22^T M22]
  const int64_t n1 = n / 2, n2 = n - n1;
  double* a21 = a + n1 * lda;
  double* a22 = a21 + n1;
  lauum_lower(n1, a, lda);
  gemm<double, double>(n1, n1, n2, 1.0, a21, 1, lda, a21, lda, 1, 1.0, a, lda, true);
  trmm_left_lower_trans(n2, n1, a22, lda, a21, lda);
  lauum_lower(n2, a22, lda);
}

}  // namespace

int64_t potrf_lower(int64_t n, double* a, int64_t lda) {
  if (n <= kBase) {
    for (int64_t j = 0; j < n; ++j) {
      double* aj = a + j * lda;
      double d = aj[j];
      for (int64_t k = 0; k < j; ++k) d -= aj[k] * aj[k];
      if (!(d > 0.0) || !std::isfinite(d)) return j + 1;
      d = std::sqrt(d);
      aj[j] = d;
      for (int64_t i = j + 1; i < n; ++i) {
        double* ai = a + i * lda;
        double s = ai[j];
        for (int64_t k = 0; k < j; ++k) s -= ai[k] * aj[k];
        ai[j] = s / d;
      }
    }
    return 0;
  }
  const int64_t n1 = n / 2, n2 = n - n1;
  if (int64_t info = potrf_lower(n1, a, lda)) return info;
  double* a21 = a + n1 * lda;
  double* a22 = a21 + n1;
  trsm_right_lower_trans(n2, n1, a, lda, a21, lda);
  gemm<double, double>(n2, n2, n1, -1.0, a21, lda, 1, a21, 1, lda, 1.0, a22, lda, true);
  if (int64_t info = potrf_lower(n2, a22, lda)) return info + n1;
  return 0;
}

void symmetrize_from_lower(int64_t n, double* a, int64_t lda) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) a[i * lda + j] = a[j * lda + i];
}

int64_t spd_inverse(int64_t n, double* a, int64_t lda) {
  // A = L L^T, A^{-1} = L^{-T} L^{-1}: potrf, trtri and lauum, n^3 / 3 flops each.
  if (int64_t info = potrf_lower(n, a, lda)) return info;
  trtri_lower(n, a, lda);
  lauum_lower(n, a, lda);
  symmetrize_from_lower(n, a, lda);
  return 0;
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
