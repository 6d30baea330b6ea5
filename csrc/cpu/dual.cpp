#include "dual.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Width of the column panels of a kernel Gram strip handed to one thread.
constexpr int64_t kGramPanel = 128;
// Rows of G_b per task of the first product W = G_b v_b.
constexpr int64_t kRowsPerTask = 32;
// Columns of G_b per task of the second product G_b^T Z: as wide as the thread count allows (a
// task reads one contiguous run of each of the R rows, and long runs stream best), at least
// kMinCols, and at most kMaxAcc float64 accumulators (width x r) so that they stay in L2.
constexpr int64_t kMinCols = 1024;
constexpr int64_t kMaxAcc = 32768;
// From this many right-hand sides on, the packed GEMM beats dot products and row sweeps.
constexpr int64_t kGemmColumns = 16;

struct Task {
  int64_t block;
  int64_t lo;
  int64_t hi;
  int64_t cost;
};

void by_cost(std::vector<Task>& tasks) {
  // Largest first, so that the dynamic schedule ends with small tasks.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

// out[q] = a_q . b for the four rows a_q = a + q * lda: b is read once for four rows of G.
template <typename T, typename U>
inline void dot4(const T* __restrict a, int64_t lda, const U* __restrict b, int64_t n,
                 double* out) {
  const T* __restrict a0 = a;
  const T* __restrict a1 = a + lda;
  const T* __restrict a2 = a + 2 * lda;
  const T* __restrict a3 = a + 3 * lda;
  double s0[4] = {0, 0, 0, 0}, s1[4] = {0, 0, 0, 0}, s2[4] = {0, 0, 0, 0}, s3[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int u = 0; u < 4; ++u) {
      const double bj = static_cast<double>(b[j + u]);
      s0[u] += static_cast<double>(a0[j + u]) * bj;
      s1[u] += static_cast<double>(a1[j + u]) * bj;
      s2[u] += static_cast<double>(a2[j + u]) * bj;
      s3[u] += static_cast<double>(a3[j + u]) * bj;
    }
  double t[4] = {(s0[0] + s0[1]) + (s0[2] + s0[3]), (s1[0] + s1[1]) + (s1[2] + s1[3]),
                 (s2[0] + s2[1]) + (s2[2] + s2[3]), (s3[0] + s3[1]) + (s3[2] + s3[3])};
  for (; j < n; ++j) {
    const double bj = static_cast<double>(b[j]);
    t[0] += static_cast<double>(a0[j]) * bj;
    t[1] += static_cast<double>(a1[j]) * bj;
    t[2] += static_cast<double>(a2[j]) * bj;
    t[3] += static_cast<double>(a3[j]) * bj;
  }
  for (int q = 0; q < 4; ++q) out[q] = t[q];
}

template <typename T, typename U>
inline double dot(const T* __restrict a, const U* __restrict b, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u)
      acc[u] += static_cast<double>(a[j + u]) * static_cast<double>(b[j + u]);
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

// Rows of W_b = G_b v_b for rows [lo, hi), transposed: wt[c * rows + i]. vb[c * ldv + j] is
// column c of v_b (ldv = 1 for one right-hand side read in place, else a float64 copy).
template <typename T, typename U>
void gv_rows(const T* gb, int64_t s, int64_t lo, int64_t hi, const U* vb, int64_t ldv, int64_t r,
             int64_t rows, double* wt) {
  for (int64_t c = 0; c < r; ++c) {
    const U* vc = vb + c * ldv;
    int64_t i = lo;
    double q4[4];
    for (; i + 4 <= hi; i += 4) {
      dot4(gb + i * s, s, vc, s, q4);
      for (int q = 0; q < 4; ++q) wt[c * rows + i + q] = q4[q];
    }
    for (; i < hi; ++i) wt[c * rows + i] = dot(gb + i * s, vc, s);
  }
}

// Below this much work (multiply-adds) a call runs on one thread: thread wake-ups and barriers
// cost more than they save, and much more on a machine whose cores are shared.
constexpr double kSerialWork = 1 << 20;

int threads_for(double work, int threads) { return work < kSerialWork ? 1 : threads; }

// Z := K^{-1} W for few right-hand sides kept as columns zt[c] (contiguous, length n): forward
// substitution by dot products with the rows of L, backward by axpys with them (every access to
// L is a contiguous row; the LAPACK-shaped trsm loops are made for many columns).
void solve_columns(int64_t n, int64_t r, const double* l, int64_t ldl, double* zt) {
  for (int64_t c = 0; c < r; ++c) {
    double* x = zt + c * n;
    for (int64_t i = 0; i < n; ++i) {
      const double* li = l + i * ldl;
      x[i] = (x[i] - dot(li, x, i)) / li[i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      const double* li = l + i * ldl;
      const double xi = x[i] / li[i];
      x[i] = xi;
      for (int64_t k = 0; k < i; ++k) x[k] -= li[k] * xi;
    }
  }
}
}  // namespace

template <typename T>
void dual_gram(const T* grads, int64_t m, int64_t d, const int64_t* table, int64_t num_blocks,
               int64_t r0, T* g, double* l, int64_t ldl, int threads) {
  if (m <= 0 || num_blocks <= 0) return;
  const DualSpec* blocks = as_dual(table);
  const int64_t r1 = r0 + m;
  int64_t total = 0;
  for (int64_t b = 0; b < num_blocks; ++b) total += blocks[b].size;
  threads = threads_for(static_cast<double>(total) * m * r1, threads);
  parallel_for(num_blocks, threads, [&](int64_t b) {
    const DualSpec& blk = blocks[b];
    T* gb = g + blk.g_offset;
    for (int64_t i = 0; i < m; ++i)
      std::copy(grads + i * d + blk.start, grads + i * d + blk.start + blk.size,
                gb + (r0 + i) * blk.size);
  });
  // Column panels of the strip K[r0:r1, 0:r1]: those left of r0 are full rectangles (new rows x
  // stored rows), those right of it lower trapezoids of the new rows' own Gram matrix.
  std::vector<Task> tasks;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t s = blocks[b].size;
    for (int64_t j0 = 0; j0 < r0; j0 += kGramPanel) {
      const int64_t j1 = std::min(r0, j0 + kGramPanel);
      tasks.push_back({b, j0, j1, m * (j1 - j0) * s});
    }
    for (int64_t j0 = r0; j0 < r1; j0 += kGramPanel) {
      const int64_t j1 = std::min(r1, j0 + kGramPanel);
      tasks.push_back({b, j0, j1, (r1 - j0) * (j1 - j0) * s});
    }
  }
  by_cost(tasks);
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
    const Task& task = tasks[static_cast<size_t>(t)];
    const DualSpec& blk = blocks[task.block];
    const int64_t s = blk.size;
    const T* gb = g + blk.g_offset;
    double* lb = l + blk.l_offset;
    const int64_t j0 = task.lo, w = task.hi - task.lo;
    if (task.hi <= r0) {
      // K[r0:r1, j0:j1] = G[r0:r1] G[j0:j1]^T
      gemm<T, T>(m, w, s, 1.0, gb + r0 * s, s, 1, gb + j0 * s, 1, s, 0.0, lb + r0 * ldl + j0,
                 ldl);
    } else {
      // K[j0:r1, j0:j1] = G[j0:r1] G[j0:j1]^T, lower part only
      gemm<T, T>(r1 - j0, w, s, 1.0, gb + j0 * s, s, 1, gb + j0 * s, 1, s, 0.0,
                 lb + j0 * ldl + j0, ldl, /*lower_only=*/true);
    }
  });
}

void dual_cholesky(double* l, const int64_t* table, int64_t num_blocks, int64_t r0, int64_t r1,
                   int64_t ldl, double shift, bool strip_solved, int64_t* info, int threads) {
  if (num_blocks <= 0) return;
  const DualSpec* blocks = as_dual(table);
  const int64_t m = r1 - r0;
  threads = threads_for(static_cast<double>(num_blocks) * m * r1 * r1, threads);
  parallel_for(num_blocks, threads, [&](int64_t b) {
    info[b] = 0;
    if (m <= 0) return;
    double* a = l + blocks[b].l_offset;
    double* a21 = a + r0 * ldl;
    double* a22 = a21 + r0;
    for (int64_t i = 0; i < m; ++i) a22[i * ldl + i] += shift;
    if (!strip_solved && r0 > 0) {
      trsm_right_lower_trans(m, r0, a, ldl, a21, ldl);  // L21 = K21 L11^{-T}
      gemm<double, double>(m, m, r0, -1.0, a21, ldl, 1, a21, 1, ldl, 1.0, a22, ldl,
                           /*lower_only=*/true);        // S = K22 - L21 L21^T
    }
    if (const int64_t code = potrf_lower(m, a22, ldl)) info[b] = r0 + code;
  });
}

template <typename T>
void dual_apply(const T* g, const double* l, const int64_t* table, int64_t num_blocks,
                int64_t rows, int64_t ldl, double damping, const T* v, int64_t d, int64_t r,
                const T* base, double scale, T* out, int threads) {
  (void)d;
  if (r <= 0 || num_blocks <= 0) return;
  const DualSpec* blocks = as_dual(table);
  const double coef = scale / damping;
  const bool use_gemm = r >= kGemmColumns;
  int64_t total = 0;
  for (int64_t b = 0; b < num_blocks; ++b) total += blocks[b].size;
  threads = threads_for(static_cast<double>(total) * r * (2 * rows + 1), threads);
  // Per block: W_b = G_b v_b (then Z_b in place), [rows, r] for the GEMM path and transposed,
  // [r, rows], for few right-hand sides; for 1 < r < kGemmColumns also v_b^T in float64
  // [r, size_b] (converted once, shared by the row tasks; one right-hand side is read in place).
  const bool transpose_v = !use_gemm && r > 1;
  std::vector<int64_t> w_off(static_cast<size_t>(num_blocks)), vt_off(w_off.size());
  int64_t w_total = 0, vt_total = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    w_off[static_cast<size_t>(b)] = w_total;
    vt_off[static_cast<size_t>(b)] = vt_total;
    w_total += rows * r;
    if (transpose_v && rows > 0) vt_total += r * blocks[b].size;
  }
  std::vector<double> w(static_cast<size_t>(w_total));
  std::vector<double> vt(static_cast<size_t>(vt_total));

  if (rows > 0) {
    if (transpose_v) {
      parallel_for(num_blocks, threads, [&](int64_t b) {
        const DualSpec& blk = blocks[b];
        double* vb = vt.data() + vt_off[static_cast<size_t>(b)];
        for (int64_t j = 0; j < blk.size; ++j)
          for (int64_t c = 0; c < r; ++c)
            vb[c * blk.size + j] = static_cast<double>(v[(blk.start + j) * r + c]);
      });
    }
    std::vector<Task> tasks;
    for (int64_t b = 0; b < num_blocks; ++b)
      for (int64_t i0 = 0; i0 < rows; i0 += kRowsPerTask) {
        const int64_t i1 = std::min(rows, i0 + kRowsPerTask);
        tasks.push_back({b, i0, i1, (i1 - i0) * blocks[b].size});
      }
    by_cost(tasks);
    // The task that finishes a block's last rows solves that block, Z_b = L_b^{-T} L_b^{-1} W_b
    // = K_b^{-1} G_b v_b, while other threads go on with other blocks' rows (no barrier).
    std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[num_blocks]);
    const int64_t tasks_per_block = (rows + kRowsPerTask - 1) / kRowsPerTask;
    for (int64_t b = 0; b < num_blocks; ++b) pending[b].store(tasks_per_block);
    parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
      const Task& task = tasks[static_cast<size_t>(t)];
      const DualSpec& blk = blocks[task.block];
      const int64_t s = blk.size;
      const T* gb = g + blk.g_offset;
      double* wb = w.data() + w_off[static_cast<size_t>(task.block)];
      if (use_gemm) {
        gemm<T, T>(task.hi - task.lo, r, s, 1.0, gb + task.lo * s, s, 1, v + blk.start * r, r, 1,
                   0.0, wb + task.lo * r, r);
      } else if (transpose_v) {
        gv_rows(gb, s, task.lo, task.hi, vt.data() + vt_off[static_cast<size_t>(task.block)], s,
                r, rows, wb);
      } else {
        gv_rows(gb, s, task.lo, task.hi, v + blk.start, 1, 1, rows, wb);
      }
      if (pending[task.block].fetch_sub(1) != 1) return;  // acq_rel: sees the other tasks' rows
      const double* lb = l + blk.l_offset;
      if (use_gemm) {
        trsm_left_lower(rows, r, lb, ldl, wb, r);
        trsm_left_lower_trans(rows, r, lb, ldl, wb, r);
      } else {
        solve_columns(rows, r, lb, ldl, wb);
      }
    });
  }

  const int64_t pieces = std::max<int64_t>(1, (2 * threads + num_blocks - 1) / num_blocks);
  int64_t max_size = 0;
  for (int64_t b = 0; b < num_blocks; ++b) max_size = std::max(max_size, blocks[b].size);
  const int64_t cols = std::min(std::max(kMinCols, (max_size + pieces - 1) / pieces),
                                std::max<int64_t>(64, kMaxAcc / r));
  std::vector<Task> tasks;
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t j0 = 0; j0 < blocks[b].size; j0 += cols) {
      const int64_t j1 = std::min(blocks[b].size, j0 + cols);
      tasks.push_back({b, j0, j1, (j1 - j0) * std::max<int64_t>(rows, 1)});
    }
  by_cost(tasks);
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t) {
    const Task& task = tasks[static_cast<size_t>(t)];
    const DualSpec& blk = blocks[task.block];
    const int64_t s = blk.size, j0 = task.lo, width = task.hi - task.lo;
    const T* gb = g + blk.g_offset + j0;
    const double* z = w.data() + w_off[static_cast<size_t>(task.block)];
    std::vector<double> acc(static_cast<size_t>(width * r), 0.0);  // [width, r] or [r, width]
    if (rows > 0 && use_gemm) {
      // acc[width, r] = G_b[:, j0:j1]^T Z_b
      gemm<T, double>(width, r, rows, 1.0, gb, 1, s, z, r, 1, 0.0, acc.data(), r);
    } else if (rows > 0) {
      // acc[c, :] = sum_i z[i, c] G_b[i, j0:j1], four rows per sweep over the accumulators
      for (int64_t c = 0; c < r; ++c) {
        double* __restrict a = acc.data() + c * width;
        int64_t i = 0;
        for (; i + 4 <= rows; i += 4) {
          const T* __restrict g0 = gb + i * s;
          const T* __restrict g1 = g0 + s;
          const T* __restrict g2 = g1 + s;
          const T* __restrict g3 = g2 + s;
          const double* zc = z + c * rows;  // Z_b^T [r, rows]
          const double z0 = zc[i], z1 = zc[i + 1], z2 = zc[i + 2], z3 = zc[i + 3];
          for (int64_t j = 0; j < width; ++j)
            a[j] += (z0 * static_cast<double>(g0[j]) + z1 * static_cast<double>(g1[j])) +
                    (z2 * static_cast<double>(g2[j]) + z3 * static_cast<double>(g3[j]));
        }
        for (; i < rows; ++i) {
          const T* __restrict g0 = gb + i * s;
          const double z0 = z[c * rows + i];
          for (int64_t j = 0; j < width; ++j) a[j] += z0 * static_cast<double>(g0[j]);
        }
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const int64_t row = blk.start + j0 + j;
      for (int64_t c = 0; c < r; ++c) {
        const double p = use_gemm ? acc[static_cast<size_t>(j * r + c)]
                                  : acc[static_cast<size_t>(c * width + j)];
        const double b0 = base != nullptr ? static_cast<double>(base[row * r + c]) : 0.0;
        out[row * r + c] =
            static_cast<T>(b0 + coef * (static_cast<double>(v[row * r + c]) - p));
      }
    }
  });
}

template <typename T>
void dual_remove_rows(T* g, double* l, const int64_t* table, int64_t num_blocks, int64_t rows,
                      int64_t ldl, const int64_t* keep, const int64_t* removed, int64_t k,
                      int64_t first, int64_t* info, int threads) {
  (void)first;  // each block starts at its own first removed row
  if (num_blocks <= 0) return;
  const DualSpec* blocks = as_dual(table);
  const int64_t kept = rows - k;
  threads = threads_for(static_cast<double>(num_blocks) * (k + 1) * rows * rows, threads);
  parallel_for(num_blocks, threads, [&](int64_t b) {
    info[b] = 0;
    if (k <= 0) return;
    const DualSpec& blk = blocks[b];
    const int64_t* kb = keep + b * kept;
    const int64_t* rb = removed + b * k;
    const int64_t p0 = rb[0];
    // G: kept rows move up in order (a row only ever moves to a lower index).
    T* gb = g + blk.g_offset;
    for (int64_t p = p0; p < kept; ++p)
      std::copy(gb + kb[p] * blk.size, gb + (kb[p] + 1) * blk.size, gb + p * blk.size);

    // L: rank-1 update t adds x_t x_t^T with x_t = L[keep, removed_t] (original values), whose
    // entries are non-zero from new row jt[t] = removed_t - t on. Row by row (contiguous
    // reads): new row p is old row keep[p] restricted to the kept columns, then each update's
    // rotations of the columns before p and its own rotation at p (LINPACK's dchud, lower).
    double* a = l + blk.l_offset;
    std::vector<double> cs(static_cast<size_t>(k * kept)), sn(cs.size());
    std::vector<double> row(static_cast<size_t>(kept)), xs(static_cast<size_t>(k));
    std::vector<int64_t> jt(static_cast<size_t>(k));
    for (int64_t t = 0; t < k; ++t) jt[static_cast<size_t>(t)] = rb[t] - t;
    for (int64_t p = p0; p < kept; ++p) {
      const int64_t i = kb[p];
      const double* old = a + i * ldl;  // read before row p (<= i) is written
      for (int64_t q = 0; q <= p; ++q) row[static_cast<size_t>(q)] = old[kb[q]];
      for (int64_t t = 0; t < k; ++t) xs[static_cast<size_t>(t)] = rb[t] < i ? old[rb[t]] : 0.0;
      for (int64_t t = 0; t < k; ++t) {
        const int64_t j0 = jt[static_cast<size_t>(t)];
        if (p < j0) break;  // jt is increasing: later updates start later still
        const double* ct = cs.data() + t * kept;
        const double* st = sn.data() + t * kept;
        double x = xs[static_cast<size_t>(t)];
        for (int64_t j = j0; j < p; ++j) {
          const double lij = (row[static_cast<size_t>(j)] + st[j] * x) / ct[j];
          x = ct[j] * x - st[j] * lij;
          row[static_cast<size_t>(j)] = lij;
        }
        const double dpp = row[static_cast<size_t>(p)];
        const double rpp = std::hypot(dpp, x);
        cs[static_cast<size_t>(t * kept + p)] = rpp / dpp;
        sn[static_cast<size_t>(t * kept + p)] = x / dpp;
        row[static_cast<size_t>(p)] = rpp;
      }
      std::copy(row.begin(), row.begin() + p + 1, a + p * ldl);
    }
  });
}

template void dual_gram<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t,
                               float*, double*, int64_t, int);
template void dual_gram<double>(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                int64_t, double*, double*, int64_t, int);
template void dual_apply<float>(const float*, const double*, const int64_t*, int64_t, int64_t,
                                int64_t, double, const float*, int64_t, int64_t, const float*,
                                double, float*, int);
template void dual_apply<double>(const double*, const double*, const int64_t*, int64_t, int64_t,
                                 int64_t, double, const double*, int64_t, int64_t, const double*,
                                 double, double*, int);
template void dual_remove_rows<float>(float*, double*, const int64_t*, int64_t, int64_t, int64_t,
                                      const int64_t*, const int64_t*, int64_t, int64_t, int64_t*,
                                      int);
template void dual_remove_rows<double>(double*, double*, const int64_t*, int64_t, int64_t,
                                       int64_t, const int64_t*, const int64_t*, int64_t, int64_t,
                                       int64_t*, int);

}  // namespace ssse::cpu
