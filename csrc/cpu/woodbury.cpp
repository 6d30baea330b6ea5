#include "woodbury.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "dense.h"

namespace ssse::cpu {

namespace {
// Square tiles of the write's float64 product W_b W_b^T (512 KiB each, per thread): a block is
// written a tile at a time, whatever its size.
constexpr int64_t kTile = 256;
// Rows of a change up to which the check reads each block in place and forms its k x k
// capacitance by dot products; more rows take the packed GEMM, which reads a block once for
// all of them (the in-place product reads it once per 96 rows).
constexpr int64_t kFewRows = 64;

// k * (size_0 + ... + size_{b-1}) for every block, in table order.
std::vector<int64_t> wt_offsets(const BlockSpec* blocks, int64_t num_blocks, int64_t k) {
  std::vector<int64_t> out(static_cast<size_t>(num_blocks));
  int64_t pos = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    out[static_cast<size_t>(b)] = pos;
    pos += k * blocks[b].size;
  }
  return out;
}

// U^T = R_b F_b^{-1} into w [k, s] and sign R_b U into c [k, k], for a block f [s, s] and its
// rows x [k, s] (leading dimension d). For a few rows: the block streamed row after row in place
// (in cache after the check's first pass) against a contiguous float64 copy of R_b (its rows,
// d apart, may share cache sets), and C by dot products (too small for the packed GEMM to pay
// its packing); for many, the packed GEMM, which reads the block once for all of them.
template <typename T, typename R>
void block_products(const T* f, int64_t s, const R* x, int64_t k, int64_t d, int sign, double* w,
                    double* c) {
  if (k > kFewRows) {
    gemm<R, T>(k, s, s, 1.0, x, d, 1, f, s, 1, 0.0, w, s);
    gemm<R, double>(k, k, s, static_cast<double>(sign), x, d, 1, w, 1, s, 0.0, c, k);
    return;
  }
  thread_local std::vector<double> xb;
  xb.resize(static_cast<size_t>(k * s));
  for (int64_t i = 0; i < k; ++i)
    std::transform(x + i * d, x + i * d + s, xb.begin() + i * s,
                   [](R e) { return static_cast<double>(e); });
  gemm_rows_b<T>(k, s, s, xb.data(), s, 1, f, s, w, s);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      c[i * k + j] = static_cast<double>(sign) * dot(xb.data() + i * s, w + j * s, s);
}
}  // namespace

template <typename T, typename R>
void woodbury_check(const T* inv, const int64_t* layout, int64_t num_blocks, const R* rows,
                    int64_t k, int64_t d, double normalizer, int sign, double* wt,
                    double* pivots, int64_t* info, int threads, const T* vecs, int64_t r,
                    bool changed, double* out, int64_t out_start) {
  if (num_blocks <= 0) return;
  if (vecs == nullptr || out == nullptr) r = 0;
  const BlockSpec* blocks = as_blocks(layout);
  const std::vector<int64_t> offsets = wt_offsets(blocks, num_blocks, k);
  const std::vector<int64_t> order = blocks_by_size(layout, num_blocks);
  parallel_for(num_blocks, threads, [&](int64_t t) {
    const int64_t b = order[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    double* piv = pivots + b * k;
    info[b] = 0;
    if (s == 0) {
      std::fill(piv, piv + k, 1.0);  // C = N I
      return;
    }
    const T* f = inv + blk.offset;
    const R* x = rows + blk.start;  // R_b: [k, s] with leading dimension d
    double* w = wt + offsets[static_cast<size_t>(b)];
    // F_b^{-1} V_b [s, r], a pass that brings the block into cache for the product below
    const T* vb = r > 0 ? vecs + blk.start * r : nullptr;
    std::vector<double> fv(static_cast<size_t>(s * r));
    if (r > 0) rows_times(f, s, s, vb, r, fv.data());
    if (k > 0) {
      // C = N I + sign R_b U, symmetrised
      std::vector<double> c(static_cast<size_t>(k * k));
      block_products(f, s, x, k, d, sign, w, c.data());
      bool finite = true;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j < i; ++j) {
          double& lo = c[static_cast<size_t>(i * k + j)];
          lo = 0.5 * (lo + c[static_cast<size_t>(j * k + i)]);
          finite = finite && std::isfinite(lo);
        }
        double& dia = c[static_cast<size_t>(i * k + i)];
        dia += normalizer;
        finite = finite && std::isfinite(dia);
      }
      std::fill(piv, piv + k, 0.0);
      if (!finite) {
        info[b] = -1;
        return;
      }
      if (int64_t code = potrf_lower(k, c.data(), k)) {
        info[b] = code;
        return;
      }
      for (int64_t i = 0; i < k; ++i) {
        const double l = c[static_cast<size_t>(i * k + i)];
        piv[i] = l * l / normalizer;
      }
      trsm_left_lower(k, s, c.data(), k, w, s);  // W^T = L^{-1} U^T
      if (changed && r > 0) {  // F^{-1} V - sign W (W^T V), W^T [k, s]
        // by dot products and row updates: r is a few vectors, too narrow for the GEMM's tile
        std::vector<double> col(static_cast<size_t>(s));
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t j = 0; j < s; ++j)
            col[static_cast<size_t>(j)] = static_cast<double>(vb[j * r + q]);
          for (int64_t i = 0; i < k; ++i) {
            const double* wi = w + i * s;
            const double coef = -static_cast<double>(sign) * dot(wi, col.data(), s);
            double* fq = fv.data() + q;
            for (int64_t j = 0; j < s; ++j) fq[j * r] += coef * wi[j];
          }
        }
      }
    }
    std::copy(fv.begin(), fv.end(), out + (blk.start - out_start) * r);
  });
}

template <typename T>
void woodbury_write(T* inv, const int64_t* layout, int64_t num_blocks, const double* wt,
                    int64_t k, int sign, int threads) {
  if (num_blocks <= 0 || k <= 0) return;
  const BlockSpec* blocks = as_blocks(layout);
  const std::vector<int64_t> offsets = wt_offsets(blocks, num_blocks, k);
  const std::vector<int64_t> order = blocks_by_size(layout, num_blocks);
  const double coef = -static_cast<double>(sign);
  parallel_for(num_blocks, threads, [&](int64_t t) {
    const int64_t b = order[static_cast<size_t>(t)];
    const BlockSpec& blk = blocks[b];
    const int64_t s = blk.size;
    if (s == 0) return;
    T* f = inv + blk.offset;
    const double* w = wt + offsets[static_cast<size_t>(b)];  // W^T [k, s]
    if (rank_update<T>(s, k, w, coef, f, s)) return;  // one pass, tiles in registers
    std::vector<double> tile(static_cast<size_t>(std::min(s, kTile) * std::min(s, kTile)));
    // Every tile in full, rows written in place: (W W^T)(i, j) and (W W^T)(j, i) are the same
    // products summed in the same order, so a symmetric block stays bitwise symmetric.
    for (int64_t i0 = 0; i0 < s; i0 += kTile) {
      const int64_t mi = std::min(kTile, s - i0);
      for (int64_t j0 = 0; j0 < s; j0 += kTile) {
        const int64_t mj = std::min(kTile, s - j0);
        // tile = (W W^T)[i0:, j0:] = W^T[:, i0:]^T W^T[:, j0:]
        gemm<double, double>(mi, mj, k, 1.0, w + i0, 1, s, w + j0, s, 1, 0.0, tile.data(), mj,
                             false);
        for (int64_t i = 0; i < mi; ++i) {
          T* row = f + (i0 + i) * s + j0;
          const double* t = tile.data() + i * mj;
          for (int64_t j = 0; j < mj; ++j)
            row[j] = static_cast<T>(static_cast<double>(row[j]) + coef * t[j]);
        }
      }
    }
  });
}

template void woodbury_check<float, float>(const float*, const int64_t*, int64_t, const float*,
                                           int64_t, int64_t, double, int, double*, double*,
                                           int64_t*, int, const float*, int64_t, bool, double*,
                                           int64_t);
template void woodbury_check<double, double>(const double*, const int64_t*, int64_t,
                                             const double*, int64_t, int64_t, double, int,
                                             double*, double*, int64_t*, int, const double*,
                                             int64_t, bool, double*, int64_t);
template void woodbury_check<double, float>(const double*, const int64_t*, int64_t, const float*,
                                            int64_t, int64_t, double, int, double*, double*,
                                            int64_t*, int, const double*, int64_t, bool, double*,
                                            int64_t);
template void woodbury_write<float>(float*, const int64_t*, int64_t, const double*, int64_t, int,
                                    int);
template void woodbury_write<double>(double*, const int64_t*, int64_t, const double*, int64_t,
                                     int, int);

}  // namespace ssse::cpu
