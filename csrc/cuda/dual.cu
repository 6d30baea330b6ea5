// Dual (low-rank) blocks on the GPU. Every kernel takes the dual table on the device; the large
// grid dimension (tiles, rows or columns) is x and the dual block is y, since dual blocks are few
// and large. Products and factors are float64 (float32 products are exact in float64); 64 x 64
// tiles use the shared-memory GEMM building blocks of tile.cuh with 4 x 4 register blocks.
#include "common.cuh"
#include "dense.cuh"
#include "dual.cuh"
#include "tile.cuh"

namespace ssse::cuda {

namespace {
using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTM = 4;  // register blocks of the float64 tile GEMMs: 256 threads per 64 x 64 tile
using TileMicro = Micro<kTM>;
constexpr int kCols = 4;       // right-hand sides per pass over G_b in the apply's two products
constexpr int kSolveCols = 8;  // right-hand sides per thread block of the solves (one warp each)
constexpr unsigned kFullMask = 0xffffffffu;

struct Dual {
  int64_t start;
  int64_t size;
  int64_t g_offset;
  int64_t l_offset;
};

__device__ __forceinline__ Dual load_dual(const int64_t* __restrict__ table, int64_t b) {
  return Dual{table[4 * b], table[4 * b + 1], table[4 * b + 2], table[4 * b + 3]};
}

// Column tile t of the factor extension over rows [r0, r1): the stored columns [0, r0) are
// tiled from 0, the new ones [r0, r1) from r0, so that every new row tile is also a column tile
// (its diagonal tile). The same index range is the rows of that tile.
struct Span {
  int64_t begin;
  int width;
};

__host__ __device__ inline Span col_span(int64_t t, int64_t told, int64_t r0, int64_t r1) {
  const int64_t begin = t < told ? t * kTile : r0 + (t - told) * kTile;
  const int64_t end = t < told ? r0 : r1;
  return Span{begin, static_cast<int>(end - begin < kTile ? end - begin : kTile)};
}

// ---- Gram strip ----------------------------------------------------------------------------

// G_b[r0 + i, :] = grads[i, start_b : start_b + size_b]
template <typename T>
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const T* __restrict__ grads,        // [m, d]
                     int64_t m, int64_t d,
                     const int64_t* __restrict__ table,  // [num_blocks, 4]
                     int64_t r0,
                     T* __restrict__ g) {                // packed G storage
  const Dual blk = load_dual(table, blockIdx.y);
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const T* src = grads + i * d + blk.start;
    T* dst = g + blk.g_offset + (r0 + i) * blk.size;
    for (int64_t j = threadIdx.x; j < blk.size; j += blockDim.x) dst[j] = src[j];
  }
}

// Tile (u, t) of the strip K[r0:r1, 0:r1]: K(i, j) = G_b[i, :] . G_b[j, :] for j <= i.
template <typename T>
__global__ void __launch_bounds__(TileMicro::kThreads)
    gram_strip_kernel(const int64_t* __restrict__ table, int64_t r0, int64_t r1, int64_t tcols,
                      const T* __restrict__ g,            // packed G storage
                      double* __restrict__ l,             // packed factor storage
                      int64_t ldl) {
  const Dual blk = load_dual(table, blockIdx.y);
  const int64_t u = blockIdx.x / tcols, t = blockIdx.x % tcols;
  const int64_t i0 = r0 + u * kTile, j0 = t * kTile;
  if (i0 >= r1) return;
  const int ni = clamp_extent(r1 - i0), nj = clamp_extent(r1 - j0);
  if (j0 > i0 + ni - 1) return;  // entirely above the diagonal
  const int64_t s = blk.size;
  const T* gi = g + blk.g_offset + i0 * s;
  const T* gj = g + blk.g_offset + j0 * s;
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % TileMicro::kStride, ty = threadIdx.x / TileMicro::kStride;
  double acc[kTM][kTM] = {};
  for (int64_t k0 = 0; k0 < s; k0 += kSlice) {
    const int kr = clamp_extent(s - k0, kSlice);
    load_slice_t<TileMicro::kThreads>(as, gi + k0, s, kr, ni);  // as[k][i] = G(i0 + i, k0 + k)
    load_slice_t<TileMicro::kThreads>(bs, gj + k0, s, kr, nj);
    __syncthreads();
    tile_fma<kTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
  double* lb = l + blk.l_offset;
#pragma unroll
  for (int a = 0; a < kTM; ++a) {
    const int i = ty + TileMicro::kStride * a;
#pragma unroll
    for (int c = 0; c < kTM; ++c) {
      const int j = tx + TileMicro::kStride * c;
      if (i < ni && j < nj && j0 + j <= i0 + i) lb[(i0 + i) * ldl + j0 + j] = acc[a][c];
    }
  }
}

// ---- factor extension (right-looking blocked Cholesky over the strip) -------------------------

// Step t, diagonal tile: a new column tile is factorised in shared memory (shift added to its
// diagonal) and written back; a stored one is read. Its inverse goes to linv_all[b].
__global__ void __launch_bounds__(kThreads)
    chol_diag_kernel(double* __restrict__ l, const int64_t* __restrict__ table, int64_t r0,
                     int64_t r1, int64_t ldl, int64_t t, int64_t told, double shift,
                     double* __restrict__ linv_all,  // [num_blocks, kTile, kTile]
                     int64_t* __restrict__ info) {   // [num_blocks]
  const int64_t b = blockIdx.x;
  if (info[b] != 0) return;
  const Dual blk = load_dual(table, b);
  const Span sp = col_span(t, told, r0, r1);
  const bool fresh = t >= told;
  extern __shared__ double smem[];
  double* p = smem;                        // [kTile][kLdSmall]
  double* linv = smem + kTile * kLdSmall;  // [kTile][kLdSmall]
  __shared__ int status;
  double* a = l + blk.l_offset;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int i = e / kTile, c = e % kTile;
    double val = (i == c) ? 1.0 : 0.0;  // padding: the identity
    if (i < sp.width && c < sp.width)
      val = c <= i ? a[(sp.begin + i) * ldl + sp.begin + c] + (fresh && i == c ? shift : 0.0)
                   : 0.0;
    p[i * kLdSmall + c] = val;
  }
  __syncthreads();
  if (fresh) {
    const int code = cholesky_smem(p, &status);
    if (code != 0) {
      if (threadIdx.x == 0) info[b] = sp.begin + code;
      return;
    }
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int i = e / kTile, c = e % kTile;
      if (i < sp.width && c <= i) a[(sp.begin + i) * ldl + sp.begin + c] = p[i * kLdSmall + c];
    }
  }
  lower_inverse_smem(p, linv);
  double* out = linv_all + b * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x)
    out[e] = linv[(e / kTile) * kLdSmall + e % kTile];
}

// Step t, panel: strip tile (u, t) := A(u, t) L_tt^{-T} for every row tile u below the diagonal.
__global__ void __launch_bounds__(TileMicro::kThreads)
    chol_panel_kernel(double* __restrict__ l, const int64_t* __restrict__ table, int64_t r0,
                      int64_t r1, int64_t ldl, int64_t t, int64_t told,
                      const double* __restrict__ linv_all, const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.y, u = blockIdx.x;
  if (info[b] != 0 || (t >= told && u <= t - told)) return;
  const int64_t i0 = r0 + u * kTile;
  if (i0 >= r1) return;
  const int ni = clamp_extent(r1 - i0);
  const Span sp = col_span(t, told, r0, r1);
  const Dual blk = load_dual(table, b);
  extern __shared__ __align__(16) double smem[];
  double* xs = smem;                // [kTile][kLd]: xs[p][i] = A(i0 + i, begin + p)
  double* ls = smem + kTile * kLd;  // [kTile][kLd]: ls[p][c] = L_tt^{-1}(c, p)
  double* a = l + blk.l_offset;
  const double* linv = linv_all + b * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int hi = e / kTile, lo = e % kTile;
    xs[lo * kLd + hi] = (lo < sp.width && hi < ni) ? a[(i0 + hi) * ldl + sp.begin + lo] : 0.0;
    ls[lo * kLd + hi] = linv[hi * kTile + lo];
  }
  __syncthreads();
  const int tx = threadIdx.x % TileMicro::kStride, ty = threadIdx.x / TileMicro::kStride;
  double acc[kTM][kTM] = {};
#pragma unroll
  for (int kk = 0; kk < kTile; kk += kSlice)
    tile_fma<kTM>(acc, xs + kk * kLd, ls + kk * kLd, tx, ty);
#pragma unroll
  for (int q = 0; q < kTM; ++q) {
    const int i = ty + TileMicro::kStride * q;
#pragma unroll
    for (int c = 0; c < kTM; ++c) {
      const int j = tx + TileMicro::kStride * c;
      if (i < ni && j < sp.width) a[(i0 + i) * ldl + sp.begin + j] = acc[q][c];
    }
  }
}

// Pairs (row tile u, column tile tc > t) updated after step t: for a stored column tile t, every
// stored column tile after it for every row tile (a rectangle) and the new column tiles up to
// each row's diagonal (a triangle); for a new one, the triangle below it.
__host__ __device__ inline int64_t trailing_pairs(int64_t t, int64_t told, int64_t tnew) {
  if (t < told) return (told - t - 1) * tnew + tnew * (tnew + 1) / 2;
  const int64_t n = tnew - (t - told) - 1;
  return n * (n + 1) / 2;
}

// Step t, trailing update: A(u, tc) -= A(u, t) L(tc, t)^T (lower part of the diagonal tile).
__global__ void __launch_bounds__(TileMicro::kThreads)
    chol_trailing_kernel(double* __restrict__ l, const int64_t* __restrict__ table, int64_t r0,
                         int64_t r1, int64_t ldl, int64_t t, int64_t told, int64_t tnew,
                         const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.y;
  if (info[b] != 0) return;
  const int64_t e = blockIdx.x;
  int64_t u, tc;
  int ti, tj;
  if (t < told) {
    const int64_t after = told - t - 1, rect = after * tnew;
    if (e < rect) {
      u = e / after;
      tc = t + 1 + e % after;
    } else {
      lower_tile(e - rect, ti, tj);
      u = ti;
      tc = told + tj;
    }
  } else {
    const int64_t u0 = t - told;
    lower_tile(e, ti, tj);
    u = u0 + 1 + ti;
    tc = told + u0 + 1 + tj;
  }
  if (u >= tnew) return;
  const int64_t i0 = r0 + u * kTile;
  const int ni = clamp_extent(r1 - i0);
  const Span cs = col_span(tc, told, r0, r1);  // target columns = rows of the right operand
  const Span ks = col_span(t, told, r0, r1);   // the finished columns: the product's depth
  const bool diagonal = tc == told + u;
  const Dual blk = load_dual(table, b);
  double* a = l + blk.l_offset;
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % TileMicro::kStride, ty = threadIdx.x / TileMicro::kStride;
  double acc[kTM][kTM] = {};
  for (int kk = 0; kk < ks.width; kk += kSlice) {
    const int kr = min(kSlice, ks.width - kk);
    load_slice_t<TileMicro::kThreads>(as, a + i0 * ldl + ks.begin + kk, ldl, kr, ni);
    load_slice_t<TileMicro::kThreads>(bs, a + cs.begin * ldl + ks.begin + kk, ldl, kr, cs.width);
    __syncthreads();
    tile_fma<kTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kTM; ++q) {
    const int i = ty + TileMicro::kStride * q;
#pragma unroll
    for (int c = 0; c < kTM; ++c) {
      const int j = tx + TileMicro::kStride * c;
      if (i < ni && j < cs.width && (!diagonal || cs.begin + j <= i0 + i))
        a[(i0 + i) * ldl + cs.begin + j] -= acc[q][c];
    }
  }
}

// ---- apply ------------------------------------------------------------------------------------

// W_b[i, c] = G_b[i, :] . v_b[:, c]: one warp per row of G_b, kCols right-hand sides per pass.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_gv_kernel(const T* __restrict__ g, const int64_t* __restrict__ table, int64_t rows,
                    const T* __restrict__ v,  // [d, r]
                    int64_t r,
                    double* __restrict__ w) {  // [num_blocks, rows, r]
  const int64_t b = blockIdx.y;
  const Dual blk = load_dual(table, b);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kCols;
  const int nc = r - c0 < kCols ? static_cast<int>(r - c0) : kCols;
  const T* gi = g + blk.g_offset + i * blk.size;
  const T* vb = v + blk.start * r + c0;
  double acc[kCols] = {};
#pragma unroll 4
  for (int64_t j = lane; j < blk.size; j += 32) {
    const double x = static_cast<double>(gi[j]);
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (c < nc) acc[c] = fma(x, static_cast<double>(vb[j * r + c]), acc[c]);
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[c] += __shfl_xor_sync(kFullMask, acc[c], o);
  if (lane < nc) {
    double sum = acc[0];
#pragma unroll
    for (int c = 1; c < kCols; ++c)
      if (lane == c) sum = acc[c];
    w[(b * rows + i) * r + c0 + lane] = sum;
  }
}

// Forward substitution W := L^{-1} W, launch k (from -1): every row tile i > k subtracts
// L(i, k) Y_k (Y_k finished by launch k - 1), then tile k + 1, now complete, is solved with its
// diagonal tile by one warp per right-hand side.
__global__ void __launch_bounds__(kThreads)
    apply_forward_kernel(const double* __restrict__ l, const int64_t* __restrict__ table,
                         int64_t rows, int64_t ldl, int64_t k, double* __restrict__ w,
                         int64_t r) {
  const int64_t b = blockIdx.y;
  const int64_t tiles = ceil_div(rows, kTile);
  const int64_t i = k + 1 + blockIdx.x;
  if (i >= tiles) return;
  const Dual blk = load_dual(table, b);
  const double* la = l + blk.l_offset;
  double* wb = w + b * rows * r;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kSolveCols;
  const int nc = r - c0 < kSolveCols ? static_cast<int>(r - c0) : kSolveCols;
  const int64_t i0 = i * kTile;
  const int ni = clamp_extent(rows - i0);
  __shared__ double ls[kTile][kTile + 1];
  __shared__ double ys[kTile][kSolveCols];
  if (k >= 0) {
    const int64_t k0 = k * kTile;  // tile k < i is a full tile
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int q = e / kTile, p = e % kTile;
      ls[q][p] = q < ni ? la[(i0 + q) * ldl + k0 + p] : 0.0;
    }
    for (int e = threadIdx.x; e < kTile * kSolveCols; e += blockDim.x) {
      const int p = e / kSolveCols, c = e % kSolveCols;
      ys[p][c] = c < nc ? wb[(k0 + p) * r + c0 + c] : 0.0;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kSolveCols; e += blockDim.x) {
      const int q = e % kTile, c = e / kTile;
      if (q < ni && c < nc) {
        double acc = 0.0;
#pragma unroll 8
        for (int p = 0; p < kTile; ++p) acc = fma(ls[q][p], ys[p][c], acc);
        wb[(i0 + q) * r + c0 + c] -= acc;
      }
    }
    __syncthreads();
  }
  if (i != k + 1) return;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int q = e / kTile, p = e % kTile;
    ls[q][p] = (q < ni && p <= q) ? la[(i0 + q) * ldl + i0 + p] : 0.0;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, c = threadIdx.x / 32;
  if (c >= nc) return;
  double* col = wb + i0 * r + c0 + c;
  double x0 = lane < ni ? col[lane * r] : 0.0;
  double x1 = lane + 32 < ni ? col[(lane + 32) * r] : 0.0;
  for (int j = 0; j < ni; ++j) {
    const double xj = __shfl_sync(kFullMask, j < 32 ? x0 : x1, j & 31) / ls[j][j];
    if (lane == (j & 31)) {
      if (j < 32) x0 = xj; else x1 = xj;
    }
    if (lane > j) x0 -= ls[lane][j] * xj;
    if (lane + 32 > j) x1 -= ls[lane + 32][j] * xj;
  }
  if (lane < ni) col[lane * r] = x0;
  if (lane + 32 < ni) col[(lane + 32) * r] = x1;
}

// Backward substitution W := L^{-T} W, launch k (from tiles down to 1): every row tile j < k
// subtracts L(k, j)^T X_k (X_k finished by launch k + 1), then tile k - 1 is solved with the
// transpose of its diagonal tile.
__global__ void __launch_bounds__(kThreads)
    apply_backward_kernel(const double* __restrict__ l, const int64_t* __restrict__ table,
                          int64_t rows, int64_t ldl, int64_t k, double* __restrict__ w,
                          int64_t r) {
  const int64_t b = blockIdx.y;
  const int64_t tiles = ceil_div(rows, kTile);
  const int64_t j = k == tiles ? tiles - 1 : static_cast<int64_t>(blockIdx.x);
  if (j >= k) return;
  const Dual blk = load_dual(table, b);
  const double* la = l + blk.l_offset;
  double* wb = w + b * rows * r;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kSolveCols;
  const int nc = r - c0 < kSolveCols ? static_cast<int>(r - c0) : kSolveCols;
  const int64_t j0 = j * kTile;
  const int nj = clamp_extent(rows - j0);
  __shared__ double ls[kTile][kTile + 1];
  __shared__ double xs[kTile][kSolveCols];
  if (k < tiles) {
    const int64_t k0 = k * kTile;
    const int nk = clamp_extent(rows - k0);
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int q = e / kTile, p = e % kTile;  // row q of tile k, column p of tile j (full)
      ls[q][p] = q < nk ? la[(k0 + q) * ldl + j0 + p] : 0.0;
    }
    for (int e = threadIdx.x; e < kTile * kSolveCols; e += blockDim.x) {
      const int q = e / kSolveCols, c = e % kSolveCols;
      xs[q][c] = (q < nk && c < nc) ? wb[(k0 + q) * r + c0 + c] : 0.0;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kSolveCols; e += blockDim.x) {
      const int p = e % kTile, c = e / kTile;
      if (p < nj && c < nc) {
        double acc = 0.0;
#pragma unroll 8
        for (int q = 0; q < kTile; ++q) acc = fma(ls[q][p], xs[q][c], acc);
        wb[(j0 + p) * r + c0 + c] -= acc;
      }
    }
    __syncthreads();
  }
  if (j != k - 1) return;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int q = e / kTile, p = e % kTile;
    ls[q][p] = (q < nj && p <= q) ? la[(j0 + q) * ldl + j0 + p] : 0.0;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, c = threadIdx.x / 32;
  if (c >= nc) return;
  double* col = wb + j0 * r + c0 + c;
  double x0 = lane < nj ? col[lane * r] : 0.0;
  double x1 = lane + 32 < nj ? col[(lane + 32) * r] : 0.0;
  for (int p = nj - 1; p >= 0; --p) {
    const double xp = __shfl_sync(kFullMask, p < 32 ? x0 : x1, p & 31) / ls[p][p];
    if (lane == (p & 31)) {
      if (p < 32) x0 = xp; else x1 = xp;
    }
    if (lane < p) x0 -= ls[p][lane] * xp;
    if (lane + 32 < p) x1 -= ls[p][lane + 32] * xp;
  }
  if (lane < nj) col[lane * r] = x0;
  if (lane + 32 < nj) col[(lane + 32) * r] = x1;
}

// out_b[j, c] = base + coef (v_b[j, c] - G_b[:, j] . Z_b[:, c]): a thread per column of G_b, so a
// warp reads 32 consecutive entries of each row; Z_b is a broadcast.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_out_kernel(const T* __restrict__ g, const int64_t* __restrict__ table, int64_t rows,
                     double coef, const T* __restrict__ v, int64_t r,
                     const T* base,                    // may alias out
                     const double* __restrict__ w,     // [num_blocks, rows, r]: Z
                     T* out) {
  const int64_t b = blockIdx.y;
  const Dual blk = load_dual(table, b);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= blk.size) return;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kCols;
  const int nc = r - c0 < kCols ? static_cast<int>(r - c0) : kCols;
  const T* gj = g + blk.g_offset + j;
  const double* z = w + b * rows * r + c0;
  double acc[kCols] = {};
#pragma unroll 4
  for (int64_t i = 0; i < rows; ++i) {
    const double x = static_cast<double>(gj[i * blk.size]);
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (c < nc) acc[c] = fma(x, z[i * r + c], acc[c]);
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    if (c >= nc) break;
    const int64_t idx = (blk.start + j) * r + c0 + c;
    const double b0 = base != nullptr ? static_cast<double>(base[idx]) : 0.0;
    out[idx] = static_cast<T>(b0 + coef * (static_cast<double>(v[idx]) - acc[c]));
  }
}

// ---- row removal ----------------------------------------------------------------------------

// ws[p, c] = L_b[keep[first + p], first + c] on the lower part, 0 above: the rows of
// T = L[keep[first:], first:] before anything is moved.
__global__ void __launch_bounds__(kThreads)
    remove_gather_kernel(const double* __restrict__ l, const int64_t* __restrict__ table,
                         int64_t ldl, const int64_t* __restrict__ keep, int64_t kept,
                         int64_t first, int64_t width, double* __restrict__ ws) {
  const int64_t b = blockIdx.y;
  const Dual blk = load_dual(table, b);
  const int64_t rows_t = kept - first;
  for (int64_t p = blockIdx.x; p < rows_t; p += gridDim.x) {
    const int64_t src = keep[b * kept + first + p];
    const double* row = l + blk.l_offset + src * ldl + first;
    double* dst = ws + (b * rows_t + p) * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x)
      dst[c] = first + c <= src ? row[c] : 0.0;
  }
}

// Kept rows move up, column by column in row order (a row only moves to a lower index, so each
// thread's column is read before it is overwritten): G_b entirely, L_b on columns [0, first).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    remove_compact_kernel(T* __restrict__ g, double* __restrict__ l,
                          const int64_t* __restrict__ table, int64_t ldl,
                          const int64_t* __restrict__ keep, int64_t kept, int64_t first) {
  const int64_t b = blockIdx.y;
  const Dual blk = load_dual(table, b);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t* kb = keep + b * kept;
  if (j < blk.size) {
    T* col = g + blk.g_offset + j;
    for (int64_t p = first; p < kept; ++p) col[p * blk.size] = col[kb[p] * blk.size];
  } else if (j - blk.size < first) {
    double* col = l + blk.l_offset + (j - blk.size);
    for (int64_t p = first; p < kept; ++p) col[p * ldl] = col[kb[p] * ldl];
  }
}

// S = T T^T into rows and columns [first, kept) of L_b (lower tiles).
__global__ void __launch_bounds__(TileMicro::kThreads)
    remove_syrk_kernel(double* __restrict__ l, const int64_t* __restrict__ table, int64_t ldl,
                       int64_t kept, int64_t first, int64_t width,
                       const double* __restrict__ ws) {
  const int64_t b = blockIdx.y;
  const Dual blk = load_dual(table, b);
  const int64_t rows_t = kept - first;
  int ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  const int64_t i0 = static_cast<int64_t>(ti) * kTile, j0 = static_cast<int64_t>(tj) * kTile;
  if (i0 >= rows_t) return;
  const int ni = clamp_extent(rows_t - i0), nj = clamp_extent(rows_t - j0);
  const double* ti_rows = ws + (b * rows_t + i0) * width;
  const double* tj_rows = ws + (b * rows_t + j0) * width;
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % TileMicro::kStride, ty = threadIdx.x / TileMicro::kStride;
  double acc[kTM][kTM] = {};
  for (int64_t k0 = 0; k0 < width; k0 += kSlice) {
    const int kr = clamp_extent(width - k0, kSlice);
    load_slice_t<TileMicro::kThreads>(as, ti_rows + k0, width, kr, ni);
    load_slice_t<TileMicro::kThreads>(bs, tj_rows + k0, width, kr, nj);
    __syncthreads();
    tile_fma<kTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
  double* a = l + blk.l_offset + first * ldl + first;
#pragma unroll
  for (int q = 0; q < kTM; ++q) {
    const int i = ty + TileMicro::kStride * q;
#pragma unroll
    for (int c = 0; c < kTM; ++c) {
      const int j = tx + TileMicro::kStride * c;
      if (i < ni && j < nj && j0 + j <= i0 + i) a[(i0 + i) * ldl + j0 + j] = acc[q][c];
    }
  }
}

void check_workspace(size_t have, size_t need) {
  if (have < need)
    throw std::invalid_argument("work must hold " + std::to_string(need) + " bytes, got " +
                                std::to_string(have));
}

unsigned dual_blocks_dim(int64_t num_blocks) { return grid_dim(num_blocks, "dual blocks"); }

// Largest block of a host dual table [num_blocks, 4].
int64_t max_block_size_dual(const int64_t* table_host, int64_t num_blocks) {
  int64_t s = 0;
  for (int64_t b = 0; b < num_blocks; ++b) s = std::max(s, table_host[4 * b + 1]);
  return s;
}

}  // namespace

template <typename T>
void dual_gram(const T* grads, int64_t m, int64_t d, const int64_t* table_host,
               const int64_t* table_dev, int64_t num_blocks, int64_t r0, T* g, double* l,
               int64_t ldl, cudaStream_t stream) {
  (void)table_host;
  if (m <= 0 || num_blocks <= 0) return;
  DeviceGuard guard(l);
  const unsigned nb = dual_blocks_dim(num_blocks);
  const unsigned row_blocks = static_cast<unsigned>(std::min<int64_t>(m, 1 << 16));
  copy_rows_kernel<T><<<dim3(row_blocks, nb), kThreads, 0, stream>>>(grads, m, d, table_dev, r0,
                                                                      g);
  SSSE_CUDA_CHECK_LAUNCH();
  const int64_t r1 = r0 + m;
  const int64_t tcols = ceil_div(r1, kTile), trows = ceil_div(m, kTile);
  gram_strip_kernel<T><<<dim3(grid_dim(trows * tcols, "tiles of the Gram strip", INT32_MAX), nb),
                         TileMicro::kThreads, 0, stream>>>(table_dev, r0, r1, tcols, g, l, ldl);
  SSSE_CUDA_CHECK_LAUNCH();
}

size_t dual_cholesky_workspace_bytes(int64_t num_blocks) {
  return section_bytes(sizeof(double) * std::max<int64_t>(num_blocks, 0) * kTile * kTile);
}

void dual_cholesky(double* l, const int64_t* table_host, const int64_t* table_dev,
                   int64_t num_blocks, int64_t r0, int64_t r1, int64_t ldl, double shift,
                   bool strip_solved, int64_t* info, void* work, size_t work_bytes,
                   cudaStream_t stream) {
  (void)table_host;
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  if (r1 <= r0) return;
  check_workspace(work_bytes, dual_cholesky_workspace_bytes(num_blocks));
  double* linv = static_cast<double*>(work);
  const unsigned nb = dual_blocks_dim(num_blocks);
  const int64_t told = ceil_div(r0, kTile), tnew = ceil_div(r1 - r0, kTile);
  const size_t diag_smem = sizeof(double) * 2 * kTile * kLdSmall;
  const size_t panel_smem = sizeof(double) * 2 * kTile * kLd;
  allow_dynamic_smem(chol_diag_kernel, diag_smem);
  allow_dynamic_smem(chol_panel_kernel, panel_smem);
  const unsigned panels = grid_dim(tnew, "row tiles of the strip", INT32_MAX);
  for (int64_t t = strip_solved ? told : 0; t < told + tnew; ++t) {
    chol_diag_kernel<<<nb, kThreads, diag_smem, stream>>>(l, table_dev, r0, r1, ldl, t, told,
                                                          shift, linv, info);
    SSSE_CUDA_CHECK_LAUNCH();
    chol_panel_kernel<<<dim3(panels, nb), TileMicro::kThreads, panel_smem, stream>>>(
        l, table_dev, r0, r1, ldl, t, told, linv, info);
    SSSE_CUDA_CHECK_LAUNCH();
    const int64_t pairs = trailing_pairs(t, told, tnew);
    if (pairs > 0) {
      chol_trailing_kernel<<<dim3(grid_dim(pairs, "trailing tiles", INT32_MAX), nb),
                             TileMicro::kThreads, 0, stream>>>(l, table_dev, r0, r1, ldl, t,
                                                               told, tnew, info);
      SSSE_CUDA_CHECK_LAUNCH();
    }
  }
}

size_t dual_apply_workspace_bytes(int64_t num_blocks, int64_t rows, int64_t r) {
  return section_bytes(sizeof(double) * std::max<int64_t>(num_blocks, 0) *
                       std::max<int64_t>(rows, 0) * std::max<int64_t>(r, 0));
}

template <typename T>
void dual_apply(const T* g, const double* l, const int64_t* table_host, const int64_t* table_dev,
                int64_t num_blocks, int64_t rows, int64_t ldl, double damping, const T* v,
                int64_t d, int64_t r, const T* base, double scale, T* out, void* work,
                size_t work_bytes, cudaStream_t stream) {
  if (d == 0 || r == 0 || num_blocks <= 0) return;
  const int64_t max_size = max_block_size_dual(table_host, num_blocks);
  if (max_size == 0) return;
  DeviceGuard guard(out);
  check_workspace(work_bytes, dual_apply_workspace_bytes(num_blocks, rows, r));
  double* w = static_cast<double*>(work);
  const unsigned nb = dual_blocks_dim(num_blocks);
  if (rows > 0) {
    apply_gv_kernel<T><<<dim3(grid_dim(ceil_div(rows, kWarps), "row groups of G", INT32_MAX), nb,
                              grid_dim(ceil_div(r, kCols), "column groups of v")),
                         kThreads, 0, stream>>>(g, table_dev, rows, v, r, w);
    SSSE_CUDA_CHECK_LAUNCH();
    const int64_t tiles = ceil_div(rows, kTile);
    const unsigned solve_cols = grid_dim(ceil_div(r, kSolveCols), "column groups of v");
    for (int64_t k = -1; k + 1 < tiles; ++k) {
      const int64_t below = k < 0 ? 1 : tiles - k - 1;
      apply_forward_kernel<<<dim3(grid_dim(below, "row tiles", INT32_MAX), nb, solve_cols),
                             kThreads, 0, stream>>>(l, table_dev, rows, ldl, k, w, r);
      SSSE_CUDA_CHECK_LAUNCH();
    }
    for (int64_t k = tiles; k >= 1; --k) {
      const int64_t above = k == tiles ? 1 : k;
      apply_backward_kernel<<<dim3(grid_dim(above, "row tiles", INT32_MAX), nb, solve_cols),
                              kThreads, 0, stream>>>(l, table_dev, rows, ldl, k, w, r);
      SSSE_CUDA_CHECK_LAUNCH();
    }
  }
  apply_out_kernel<T><<<dim3(grid_dim(ceil_div(max_size, kThreads), "column groups of G",
                                      INT32_MAX),
                             nb, grid_dim(ceil_div(r, kCols), "column groups of v")),
                        kThreads, 0, stream>>>(g, table_dev, rows, scale / damping, v, r, base, w,
                                               out);
  SSSE_CUDA_CHECK_LAUNCH();
}

size_t dual_remove_rows_workspace_bytes(int64_t num_blocks, int64_t rows, int64_t k,
                                        int64_t first) {
  const int64_t rows_t = std::max<int64_t>(rows - k - first, 0);
  const int64_t width = std::max<int64_t>(rows - first, 0);
  return section_bytes(sizeof(double) * std::max<int64_t>(num_blocks, 0) * rows_t * width) +
         dual_cholesky_workspace_bytes(num_blocks);
}

template <typename T>
void dual_remove_rows(T* g, double* l, const int64_t* table_host, const int64_t* table_dev,
                      int64_t num_blocks, int64_t rows, int64_t ldl, const int64_t* keep,
                      const int64_t* removed, int64_t k, int64_t first, int64_t* info,
                      void* work, size_t work_bytes, cudaStream_t stream) {
  (void)removed;  // keep and first say everything the refactor needs
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  const int64_t kept = rows - k;
  if (k <= 0 || first >= kept) return;  // nothing removed, or only trailing rows
  check_workspace(work_bytes, dual_remove_rows_workspace_bytes(num_blocks, rows, k, first));
  const int64_t rows_t = kept - first, width = rows - first;
  double* ws = static_cast<double*>(work);
  const size_t ws_bytes = section_bytes(sizeof(double) * num_blocks * rows_t * width);
  void* chol_work = static_cast<char*>(work) + ws_bytes;
  const unsigned nb = dual_blocks_dim(num_blocks);
  const int64_t max_size = max_block_size_dual(table_host, num_blocks);

  remove_gather_kernel<<<dim3(static_cast<unsigned>(std::min<int64_t>(rows_t, 1 << 16)), nb),
                         kThreads, 0, stream>>>(l, table_dev, ldl, keep, kept, first, width, ws);
  SSSE_CUDA_CHECK_LAUNCH();
  remove_compact_kernel<T><<<dim3(grid_dim(ceil_div(max_size + first, kThreads),
                                           "columns to compact", INT32_MAX),
                                  nb),
                             kThreads, 0, stream>>>(g, l, table_dev, ldl, keep, kept, first);
  SSSE_CUDA_CHECK_LAUNCH();
  const int64_t tiles = ceil_div(rows_t, kTile);
  remove_syrk_kernel<<<dim3(grid_dim(tiles * (tiles + 1) / 2, "lower tiles", INT32_MAX), nb),
                       TileMicro::kThreads, 0, stream>>>(l, table_dev, ldl, kept, first, width,
                                                         ws);
  SSSE_CUDA_CHECK_LAUNCH();
  dual_cholesky(l, table_host, table_dev, num_blocks, first, kept, ldl, 0.0,
                /*strip_solved=*/true, info, chol_work, dual_cholesky_workspace_bytes(num_blocks),
                stream);
}

template void dual_gram<float>(const float*, int64_t, int64_t, const int64_t*, const int64_t*,
                               int64_t, int64_t, float*, double*, int64_t, cudaStream_t);
template void dual_gram<double>(const double*, int64_t, int64_t, const int64_t*, const int64_t*,
                                int64_t, int64_t, double*, double*, int64_t, cudaStream_t);
template void dual_apply<float>(const float*, const double*, const int64_t*, const int64_t*,
                                int64_t, int64_t, int64_t, double, const float*, int64_t, int64_t,
                                const float*, double, float*, void*, size_t, cudaStream_t);
template void dual_apply<double>(const double*, const double*, const int64_t*, const int64_t*,
                                 int64_t, int64_t, int64_t, double, const double*, int64_t,
                                 int64_t, const double*, double, double*, void*, size_t,
                                 cudaStream_t);
template void dual_remove_rows<float>(float*, double*, const int64_t*, const int64_t*, int64_t,
                                      int64_t, int64_t, const int64_t*, const int64_t*, int64_t,
                                      int64_t, int64_t*, void*, size_t, cudaStream_t);
template void dual_remove_rows<double>(double*, double*, const int64_t*, const int64_t*, int64_t,
                                       int64_t, int64_t, const int64_t*, const int64_t*, int64_t,
                                       int64_t, int64_t*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda
