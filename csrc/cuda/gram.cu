// Stable build on the GPU: float64 Gram accumulation over lower tiles, then a blocked symmetric
// sweep (Gauss-Jordan on an SPD matrix, no pivoting needed) that leaves -F^{-1} in the lower
// triangle. Pivot step k (columns K = [k kTile, (k+1) kTile)), with P = A_KK the current
// Schur complement, Y = A_{:,K} and V = Y P^{-1}:
//   A_KK <- -P^{-1},   A_iK <- V_i,   A_ij <- A_ij - Y_i V_j^T   (i, j outside K)
// Every step is one rank-kTile update of the lower triangle (s^3 flops in all, the cost of
// potrf + trtri + lauum) in one GEMM-shaped kernel; P is factorised by Cholesky, so a block that
// is not positive definite is reported with the same 1-based pivot as potrf.
#include "common.cuh"
#include "dense.cuh"
#include "gram.cuh"
#include "tile.cuh"

namespace ssse::cuda {

namespace {
using namespace detail;

constexpr int kGemmTM = 8;  // 8 x 8 register blocks: 64 threads per 64 x 64 tile
using GemmMicro = Micro<kGemmTM>;
constexpr int kPanelTM = 4;  // the small panel GEMM: 256 threads
using PanelMicro = Micro<kPanelTM>;
constexpr int kElementwiseThreads = 256;

// gram_b[tile (ti, tj)] += X_ti^T X_tj over all m rows, float64, lower triangle only.
template <typename T>
__global__ void __launch_bounds__(GemmMicro::kThreads)
    gram_kernel(const T* __restrict__ grads,          // [m, d]
                int64_t m, int64_t d,
                const int64_t* __restrict__ layout,  // [num_blocks, 3]
                double* __restrict__ gram) {         // packed
  const Block blk = load_block(layout, blockIdx.x);
  const int64_t s = blk.size;
  int ti, tj;
  lower_tile(blockIdx.y, ti, tj);
  if (static_cast<int64_t>(ti) * kTile >= s) return;
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % GemmMicro::kStride, ty = threadIdx.x / GemmMicro::kStride;
  const int rows_i = clamp_extent(s - ti * kTile);
  const int rows_j = clamp_extent(s - tj * kTile);
  const T* xi = grads + blk.start + ti * kTile;
  const T* xj = grads + blk.start + tj * kTile;
  double acc[kGemmTM][kGemmTM] = {};
  for (int64_t k0 = 0; k0 < m; k0 += kSlice) {
    const int kr = clamp_extent(m - k0, kSlice);
    load_slice<GemmMicro::kThreads>(as, xi + k0 * d, d, kr, rows_i);
    load_slice<GemmMicro::kThreads>(bs, xj + k0 * d, d, kr, rows_j);
    __syncthreads();
    tile_fma<kGemmTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
  const int64_t i0 = static_cast<int64_t>(ti) * kTile + ty, j0 = static_cast<int64_t>(tj) * kTile + tx;
  const int64_t row_step = static_cast<int64_t>(GemmMicro::kStride) * s;
  double* p = gram + blk.offset + i0 * s + j0;
#pragma unroll
  for (int a = 0; a < kGemmTM; ++a, p += row_step) {
    const int64_t i = i0 + GemmMicro::kStride * a;
#pragma unroll
    for (int c = 0; c < kGemmTM; ++c)
      if (i < s && j0 + GemmMicro::kStride * c <= i) p[GemmMicro::kStride * c] += acc[a][c];
  }
}

// A = gram / normalizer + damping I on the lower triangle.
__global__ void __launch_bounds__(kElementwiseThreads)
    prepare_kernel(double* __restrict__ gram, const int64_t* __restrict__ layout, double damping,
                   double inv_n) {
  const Block blk = load_block(layout, blockIdx.x);
  const int64_t s = blk.size;
  int ti, tj;
  lower_tile(blockIdx.y, ti, tj);
  if (static_cast<int64_t>(ti) * kTile >= s) return;
  double* a = gram + blk.offset;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int64_t i = static_cast<int64_t>(ti) * kTile + e / kTile;
    const int64_t j = static_cast<int64_t>(tj) * kTile + e % kTile;
    if (i < s && j <= i) a[i * s + j] = a[i * s + j] * inv_n + (i == j ? damping : 0.0);
  }
}

// Pivot step k: P^{-1} from the Cholesky factor of the pivot block (padded with I to kTile);
// P^{-1} goes to the workspace, -P^{-1} into A_KK. A failed factorisation sets info[b].
__global__ void __launch_bounds__(kElementwiseThreads)
    sweep_pivot_kernel(double* __restrict__ gram, const int64_t* __restrict__ layout, int k,
                       double* __restrict__ pinv_all,  // [num_blocks, kTile, kTile]
                       int64_t* __restrict__ info) {   // [num_blocks]
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(k) * kTile;
  if (k0 >= s || info[b] != 0) return;
  const int nk = clamp_extent(s - k0);
  extern __shared__ double smem[];
  double* p = smem;                          // [kTile][kLdSmall]
  double* linv = smem + kTile * kLdSmall;    // [kTile][kLdSmall]
  __shared__ int status;
  double* a = gram + blk.offset;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int i = e / kTile, c = e % kTile;
    double val = (i == c) ? 1.0 : 0.0;
    if (i < nk && c < nk) val = (c <= i) ? a[(k0 + i) * s + k0 + c] : 0.0;
    p[i * kLdSmall + c] = val;
  }
  __syncthreads();
  const int code = cholesky_smem(p, &status);
  if (code != 0) {
    if (threadIdx.x == 0) info[b] = k0 + code;
    return;
  }
  lower_inverse_smem(p, linv);
  double* pinv = pinv_all + b * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int i = e / kTile, c = e % kTile;
    double acc = 0.0;  // (L^{-T} L^{-1})_ic, same summation order for (i, c) and (c, i)
    for (int q = max(i, c); q < kTile; ++q) acc += linv[q * kLdSmall + i] * linv[q * kLdSmall + c];
    pinv[i * kTile + c] = acc;
    if (i < nk && c <= i) a[(k0 + i) * s + k0 + c] = -acc;
  }
}

// Pivot step k, row tile t != k: gathers Y_t = A(tile t, K) from the lower storage, writes Y_t^T
// and V_t^T = P^{-1} Y_t^T to the [kTile, ldw] workspaces and V_t into A(tile t, K).
__global__ void __launch_bounds__(PanelMicro::kThreads)
    sweep_panel_kernel(double* __restrict__ gram, const int64_t* __restrict__ layout, int k,
                       const double* __restrict__ pinv_all,  // [num_blocks, kTile, kTile]
                       double* __restrict__ yt,              // [kTile, ldw]
                       double* __restrict__ vt,              // [kTile, ldw]
                       int64_t ldw, const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int t = blockIdx.y;
  const int64_t s = blk.size, k0 = static_cast<int64_t>(k) * kTile;
  const int64_t t0 = static_cast<int64_t>(t) * kTile;
  if (k0 >= s || t0 >= s || t == k || info[b] != 0) return;
  const int nk = clamp_extent(s - k0);
  const int nt = clamp_extent(s - t0);
  extern __shared__ __align__(16) double smem[];
  double* ys = smem;                // [kTile][kLd]: ys[p][i] = A(t0 + i, k0 + p)
  double* ps = smem + kTile * kLd;  // [kTile][kLd]: P^{-1}
  double* a = gram + blk.offset;
  const double* pinv = pinv_all + b * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    if (t > k) {  // A(t0 + i, k0 + p) is stored: p is the contiguous index
      const int p = e % kTile, i = e / kTile;
      ys[p * kLd + i] = (p < nk && i < nt) ? a[(t0 + i) * s + k0 + p] : 0.0;
    } else {      // stored transposed as A(k0 + p, t0 + i): i is contiguous
      const int i = e % kTile, p = e / kTile;
      ys[p * kLd + i] = (p < nk && i < nt) ? a[(k0 + p) * s + t0 + i] : 0.0;
    }
    ps[(e / kTile) * kLd + e % kTile] = pinv[e];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int p = e / kTile, i = e % kTile;
    if (i < nt) yt[p * ldw + blk.start + t0 + i] = ys[p * kLd + i];
  }
  const int tx = threadIdx.x % PanelMicro::kStride, ty = threadIdx.x / PanelMicro::kStride;
  double acc[kPanelTM][kPanelTM] = {};
#pragma unroll
  for (int kk = 0; kk < kTile; kk += kSlice)
    tile_fma<kPanelTM>(acc, ps + kk * kLd, ys + kk * kLd, tx, ty);
#pragma unroll
  for (int r = 0; r < kPanelTM; ++r) {
    const int c = ty + PanelMicro::kStride * r;  // column of the pivot block
#pragma unroll
    for (int q = 0; q < kPanelTM; ++q) {
      const int i = tx + PanelMicro::kStride * q;  // row within tile t
      if (i >= nt) continue;
      vt[c * ldw + blk.start + t0 + i] = acc[r][q];
      if (c < nk) {
        if (t > k)
          a[(t0 + i) * s + k0 + c] = acc[r][q];
        else
          a[(k0 + c) * s + t0 + i] = acc[r][q];
      }
    }
  }
}

// Pivot step k: A(ti, tj) -= Y_ti V_tj^T for every lower tile outside row and column tile k.
__global__ void __launch_bounds__(GemmMicro::kThreads)
    sweep_update_kernel(double* __restrict__ gram, const int64_t* __restrict__ layout, int k,
                        const double* __restrict__ yt,  // [kTile, ldw]
                        const double* __restrict__ vt,  // [kTile, ldw]
                        int64_t ldw, const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(k) * kTile;
  int ti, tj;
  lower_tile(blockIdx.y, ti, tj);
  if (ti == k || tj == k || static_cast<int64_t>(ti) * kTile >= s || k0 >= s || info[b] != 0)
    return;
  const int nk = clamp_extent(s - k0);
  const int rows_i = clamp_extent(s - ti * kTile);
  const int rows_j = clamp_extent(s - tj * kTile);
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % GemmMicro::kStride, ty = threadIdx.x / GemmMicro::kStride;
  double* a = gram + blk.offset;
  // Element (r, c) of the thread's register block is A(i0 + r kStride, j0 + c kStride).
  const int64_t i0 = static_cast<int64_t>(ti) * kTile + ty, j0 = static_cast<int64_t>(tj) * kTile + tx;
  const int64_t row_step = static_cast<int64_t>(GemmMicro::kStride) * s;
  double acc[kGemmTM][kGemmTM];
  {
    const double* p = a + i0 * s + j0;
#pragma unroll
    for (int r = 0; r < kGemmTM; ++r, p += row_step) {
      const int64_t i = i0 + GemmMicro::kStride * r;
#pragma unroll
      for (int c = 0; c < kGemmTM; ++c)
        acc[r][c] = (i < s && j0 + GemmMicro::kStride * c <= i) ? p[GemmMicro::kStride * c] : 0.0;
    }
  }
  const double* yi = yt + blk.start + ti * kTile;
  const double* vj = vt + blk.start + tj * kTile;
  for (int kk = 0; kk < nk; kk += kSlice) {
    const int kr = min(kSlice, nk - kk);
    load_slice<GemmMicro::kThreads>(as, yi + kk * ldw, ldw, kr, rows_i, -1.0);
    load_slice<GemmMicro::kThreads>(bs, vj + kk * ldw, ldw, kr, rows_j);
    __syncthreads();
    tile_fma<kGemmTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
  double* p = a + i0 * s + j0;
#pragma unroll
  for (int r = 0; r < kGemmTM; ++r, p += row_step) {
    const int64_t i = i0 + GemmMicro::kStride * r;
#pragma unroll
    for (int c = 0; c < kGemmTM; ++c)
      if (i < s && j0 + GemmMicro::kStride * c <= i) p[GemmMicro::kStride * c] = acc[r][c];
  }
}

// out_b = -A_b in T, both triangles from the lower one (tile transposed through shared memory).
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads)
    sweep_finalize_kernel(const double* __restrict__ gram, const int64_t* __restrict__ layout,
                          T* __restrict__ out, const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t s = blk.size;
  const int ti = blockIdx.y, tj = blockIdx.z;
  if (static_cast<int64_t>(max(ti, tj)) * kTile >= s || info[b] != 0) return;
  __shared__ double tile[kTile][kTile + 1];
  const int si = max(ti, tj), sj = min(ti, tj);  // the stored (lower) tile
  const double* a = gram + blk.offset;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = static_cast<int64_t>(si) * kTile + r, j = static_cast<int64_t>(sj) * kTile + c;
    tile[r][c] = (i < s && j <= i) ? a[i * s + j] : 0.0;
  }
  __syncthreads();
  T* o = out + blk.offset;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = static_cast<int64_t>(ti) * kTile + r, j = static_cast<int64_t>(tj) * kTile + c;
    if (i >= s || j >= s) continue;
    const bool stored = ti > tj || (ti == tj && r >= c);
    o[i * s + j] = static_cast<T>(-(stored ? tile[r][c] : tile[c][r]));
  }
}

struct SweepWorkspace {
  double* pinv;  // [num_blocks, kTile, kTile]
  double* yt;    // [kTile, ldw]
  double* vt;    // [kTile, ldw]
  size_t bytes;
};

SweepWorkspace sweep_workspace(void* base, int64_t num_blocks, int64_t ldw) {
  const size_t pinv = section_bytes(sizeof(double) * num_blocks * kTile * kTile);
  const size_t panel = section_bytes(sizeof(double) * kTile * ldw);
  char* p = static_cast<char*>(base);
  return SweepWorkspace{reinterpret_cast<double*>(p), reinterpret_cast<double*>(p + pinv),
                        reinterpret_cast<double*>(p + pinv + panel), pinv + 2 * panel};
}

}  // namespace

template <typename T>
void gram_accumulate(const T* grads, int64_t m, int64_t d, const int64_t* layout_host,
                     const int64_t* layout_dev, int64_t num_blocks, double* gram,
                     cudaStream_t stream) {
  if (m <= 0 || num_blocks <= 0) return;
  const int64_t tiles = ceil_div(max_block_size(layout_host, num_blocks), kTile);
  if (tiles == 0) return;
  DeviceGuard guard(gram);
  const dim3 grid(grid_dim(num_blocks, "num_blocks", INT32_MAX),
                  grid_dim(tiles * (tiles + 1) / 2, "lower tiles of the largest block"));
  gram_kernel<T><<<grid, GemmMicro::kThreads, 0, stream>>>(grads, m, d, layout_dev, gram);
  SSSE_CUDA_CHECK_LAUNCH();
}

size_t inverse_from_gram_workspace_bytes(const int64_t* layout_host, int64_t num_blocks) {
  if (num_blocks <= 0) return 0;
  return sweep_workspace(nullptr, num_blocks, layout_extent(layout_host, num_blocks)).bytes;
}

template <typename T>
void inverse_from_gram(double* gram, const int64_t* layout_host, const int64_t* layout_dev,
                       int64_t num_blocks, double damping, double normalizer, T* out,
                       int64_t* info, void* work, size_t work_bytes, cudaStream_t stream) {
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  const int64_t tiles = ceil_div(max_block_size(layout_host, num_blocks), kTile);
  if (tiles == 0) return;
  const int64_t ldw = layout_extent(layout_host, num_blocks);
  const SweepWorkspace ws = sweep_workspace(work, num_blocks, ldw);
  if (work_bytes < ws.bytes)
    throw std::invalid_argument("work must hold " + std::to_string(ws.bytes) + " bytes, got " +
                                std::to_string(work_bytes));
  const unsigned nb = grid_dim(num_blocks, "num_blocks", INT32_MAX);
  const unsigned lower = grid_dim(tiles * (tiles + 1) / 2, "lower tiles of the largest block");
  const unsigned rows = grid_dim(tiles, "row tiles of the largest block");

  prepare_kernel<<<dim3(nb, lower), kElementwiseThreads, 0, stream>>>(gram, layout_dev, damping,
                                                                      1.0 / normalizer);
  SSSE_CUDA_CHECK_LAUNCH();
  const size_t pivot_smem = sizeof(double) * 2 * kTile * kLdSmall;
  const size_t panel_smem = sizeof(double) * 2 * kTile * kLd;
  allow_dynamic_smem(sweep_pivot_kernel, pivot_smem);
  allow_dynamic_smem(sweep_panel_kernel, panel_smem);
  for (int k = 0; k < static_cast<int>(tiles); ++k) {
    sweep_pivot_kernel<<<nb, kElementwiseThreads, pivot_smem, stream>>>(gram, layout_dev, k,
                                                                        ws.pinv, info);
    SSSE_CUDA_CHECK_LAUNCH();
    sweep_panel_kernel<<<dim3(nb, rows), PanelMicro::kThreads, panel_smem, stream>>>(
        gram, layout_dev, k, ws.pinv, ws.yt, ws.vt, ldw, info);
    SSSE_CUDA_CHECK_LAUNCH();
    if (tiles > 1) {
      sweep_update_kernel<<<dim3(nb, lower), GemmMicro::kThreads, 0, stream>>>(
          gram, layout_dev, k, ws.yt, ws.vt, ldw, info);
      SSSE_CUDA_CHECK_LAUNCH();
    }
  }
  sweep_finalize_kernel<T><<<dim3(nb, rows, rows), kElementwiseThreads, 0, stream>>>(
      gram, layout_dev, out, info);
  SSSE_CUDA_CHECK_LAUNCH();
}

template void gram_accumulate<float>(const float*, int64_t, int64_t, const int64_t*,
                                     const int64_t*, int64_t, double*, cudaStream_t);
template void gram_accumulate<double>(const double*, int64_t, int64_t, const int64_t*,
                                      const int64_t*, int64_t, double*, cudaStream_t);
template void inverse_from_gram<float>(double*, const int64_t*, const int64_t*, int64_t, double,
                                       double, float*, int64_t*, void*, size_t, cudaStream_t);
template void inverse_from_gram<double>(double*, const int64_t*, const int64_t*, int64_t, double,
                                        double, double*, int64_t*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda
