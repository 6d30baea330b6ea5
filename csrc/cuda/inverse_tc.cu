// Blocked inverse of F_b = damping I + gram_b / normalizer on float64 tensor cores: the symmetric
// Gauss-Jordan sweep of gram.cu (pivot blocks of kTile = 64, lower storage, potrf's info), with
// the panel and the trailing update on DMMA and no workspace that grows with d.
//
// Pivot step K (columns [k0, k0 + nk)), P = A_KK, Y_i = A(tile i, K), V_i = Y_i P^{-1}:
//   A_KK <- -P^{-1},  A_ij <- A_ij - Y_i V_j^T (i, j != K, lower tiles),  A_iK <- V_i.
// V_i must not overwrite Y_i while the update still reads it, and every element (p, q) of the
// "cross" (one index in K, the other not) has a stored position G[max(p,q)][min(p,q)] (holding Y)
// and an unused mirror G[min(p,q)][max(p,q)] in the upper triangle of the gram block. So:
//   pivot    (one CTA per block):        Cholesky of P (info as potrf), A_KK <- -P^{-1}
//   panel    (CTA per block, tile i):    mirror <- V_i = Y_i P^{-1}                 (DMMA)
//   update   (CTA per block, tile i,j):  A_ij <- A_ij - Y_i V_j^T, Y and V from the cross (DMMA)
//   copyback (CTA per block, tile i):    stored <- mirror
// and after the last step out = -A, both triangles. Work lists come from a Plan keyed by tiles per
// side, sorted so that the blocks still active at step K are a prefix; no CTA lands on an empty
// tile. The workspace is the plan only (O(num_blocks)).
#include "common.cuh"
#include "dense.cuh"
#include "device.cuh"
#include "gram.cuh"
#include "plan.cuh"
#include "tile.cuh"

namespace ssse::cuda::tc {

namespace {
using detail::Block;
using detail::clamp_extent;
using detail::load_block;
using detail::lower_tile;

constexpr int kLd = kTile + 4;    // = 4 (mod 16) doubles: conflict-free fragment loads
constexpr int kMmaThreads = 128;  // 4 warps, 2 x 2 warp tiles of 32 x 32
constexpr int kThreads = 256;
constexpr size_t kMmaSmem = sizeof(double) * 2 * kTile * kLd;
constexpr size_t kPivotSmem = sizeof(double) * 2 * kTile * detail::kLdSmall + 16;

// A = gram / normalizer + damping I on the lower triangle (lower tiles of every block).
__global__ void __launch_bounds__(kThreads)
    sweep_prepare_kernel(double* __restrict__ gram,            // packed [sum size_b^2]
                         const int64_t* __restrict__ layout,   // [num_blocks, 3]
                         const int64_t* __restrict__ order,    // [ranked]
                         const __grid_constant__ ClassTable table, double damping, double inv_n) {
  const WorkItem w = find_work(table, order, blockIdx.x);
  const Block blk = load_block(layout, w.block);
  int ti, tj;
  lower_tile(w.index, ti, tj);
  double* a = gram + blk.offset;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int64_t i = static_cast<int64_t>(ti) * kTile + e / kTile;
    const int64_t j = static_cast<int64_t>(tj) * kTile + e % kTile;
    if (i < blk.size && j <= i) a[i * blk.size + j] = a[i * blk.size + j] * inv_n + (i == j ? damping : 0.0);
  }
}

// Step K, one CTA per active block (ranks [0, active) of order): Cholesky of P = A_KK (padded with
// I to kTile) and A_KK <- -P^{-1}. A failed factorisation sets info[b] = k0 + pivot.
__global__ void __launch_bounds__(kThreads)
    sweep_pivot_kernel(double* __restrict__ gram,            // packed [sum size_b^2]
                       const int64_t* __restrict__ layout,   // [num_blocks, 3]
                       const int64_t* __restrict__ order,    // [ranked]
                       int step,
                       int64_t* __restrict__ info) {       // [num_blocks]
  const int64_t b = order[blockIdx.x];
  if (info[b] != 0) return;
  const Block blk = load_block(layout, b);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(step) * kTile;
  const int nk = clamp_extent(s - k0, kTile);
  double* smem = dev::dynamic_smem<double>();
  double* p = smem;                                  // [kTile][kLdSmall]
  double* linv = smem + kTile * detail::kLdSmall;    // [kTile][kLdSmall]
  int* status = reinterpret_cast<int*>(smem + 2 * kTile * detail::kLdSmall);
  double* a = gram + blk.offset;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int i = e / kTile, c = e % kTile;
    double v = (i == c) ? 1.0 : 0.0;
    if (i < nk && c < nk) v = (c <= i) ? a[(k0 + i) * s + k0 + c] : 0.0;
    p[i * detail::kLdSmall + c] = v;
  }
  __syncthreads();
  // Only the leading nk x nk is factorised (a small block costs (nk / 64)^2 of a full pivot).
  const int code = detail::cholesky_smem(p, status, nk);
  if (code != 0) {
    if (threadIdx.x == 0) info[b] = k0 + code;
    return;
  }
  detail::lower_inverse_smem(p, linv, nk);
  // P^{-1} = L^{-T} L^{-1}, summed in the same order for (i, c) and (c, i).
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int i = e / kTile, c = e % kTile;
    if (i >= nk || c > i) continue;
    double acc = 0.0;
    for (int q = i; q < nk; ++q)
      acc += linv[q * detail::kLdSmall + i] * linv[q * detail::kLdSmall + c];
    a[(k0 + i) * s + k0 + c] = -acc;
  }
}

// Element (u, v) of a kTile x kTile window at rows u0, columns v0 of the block matrix a (pitch s),
// into smem (row pitch kLd) at position (u, v) when !trans, (v, u) when trans; zero outside
// nu x nv. 8-byte cp.async: any pitch. Consecutive threads take consecutive v (contiguous).
__device__ __forceinline__ void stage_window(double* __restrict__ dst, const double* __restrict__ a,
                                             int64_t s, int64_t u0, int64_t v0, int nu, int nv,
                                             bool trans) {
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += static_cast<int>(blockDim.x)) {
    const int u = e / kTile, v = e % kTile;
    const bool ok = u < nu && v < nv;
    dev::cp_async_8(dst + (trans ? v * kLd + u : u * kLd + v), ok ? a + (u0 + u) * s + v0 + v : a,
                    ok ? 8 : 0);
  }
}

// Step K, CTA per (active block, row tile i != K): V_i = Y_i P^{-1} into the mirror of the cross.
// With S = A_KK = -P^{-1} (lower stored): acc = Y_i S, V_i = -acc.
template <bool kNative>
__global__ void __launch_bounds__(kMmaThreads)
    sweep_panel_kernel(double* __restrict__ gram,            // packed [sum size_b^2]
                       const int64_t* __restrict__ layout,   // [num_blocks, 3]
                       const int64_t* __restrict__ order,  // [ranked]
                       const __grid_constant__ ClassTable table, int step,
                       const int64_t* __restrict__ info) {    // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(step) * kTile;
  const int nk = clamp_extent(s - k0, kTile);
  const int it = static_cast<int>(w.index) + (w.index >= step ? 1 : 0);
  const int64_t i0 = static_cast<int64_t>(it) * kTile;
  const int ni = clamp_extent(s - i0, kTile);
  const bool below = it > step;
  double* a = gram + blk.offset;
  double* ys = dev::dynamic_smem<double>();  // Y_i: below ? [r][c] : [c][r]
  double* ss = ys + kTile * kLd;             // S: [k][n], full
  // Y_i(r, c) = A[max(p, q)][min(p, q)], p = i0 + r, q = k0 + c.
  if (below)
    stage_window(ys, a, s, i0, k0, ni, nk, false);
  else
    stage_window(ys, a, s, k0, i0, nk, ni, false);
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kMmaThreads) {
    const int k = e / kTile, n = e % kTile;
    const bool ok = k < nk && n < nk;
    const int hi = k > n ? k : n, lo = k > n ? n : k;
    dev::cp_async_8(ss + k * kLd + n, ok ? a + (k0 + hi) * s + k0 + lo : a, ok ? 8 : 0);
  }
  dev::cp_async_commit();
  dev::cp_async_wait<0>();
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int m0 = (warp >> 1) * 32, n0 = (warp & 1) * 32;
  double acc[2][4][4] = {};
  // A(m = r, k = c): below ? ys[r * kLd + c] : ys[c * kLd + r].
  dev::warp_mma<kNative, 2, 4>(acc, ys, below ? 1 : kLd, below ? kLd : 1, ss, kLd, 1, m0, n0,
                               (nk + 3) & ~3);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = m0 + dev::acc_row(i, e), n = n0 + dev::acc_col(j, e);
        if (r >= ni || n >= nk) continue;
        // Mirror of (p, q) = (i0 + r, k0 + n): A[min][max].
        if (below)
          a[(k0 + n) * s + i0 + r] = -acc[i][j][e];
        else
          a[(i0 + r) * s + k0 + n] = -acc[i][j][e];
      }
}

// Step K, CTA per (active block, lower tile (i, j) with i, j != K): A_ij <- A_ij - Y_i V_j^T,
// computed as -((-A_ij) + Y_i V_j^T) so that the tensor-core accumulate needs no negated operand.
template <bool kNative>
__global__ void __launch_bounds__(kMmaThreads)
    sweep_update_kernel(double* __restrict__ gram,            // packed [sum size_b^2]
                        const int64_t* __restrict__ layout,   // [num_blocks, 3]
                        const int64_t* __restrict__ order,  // [ranked]
                        const __grid_constant__ ClassTable table, int step,
                        const int64_t* __restrict__ info) {   // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(step) * kTile;
  const int nk = clamp_extent(s - k0, kTile);
  int ip, jp;
  lower_tile(w.index, ip, jp);
  const int it = ip + (ip >= step ? 1 : 0), jt = jp + (jp >= step ? 1 : 0);
  const int64_t i0 = static_cast<int64_t>(it) * kTile, j0 = static_cast<int64_t>(jt) * kTile;
  const int ni = clamp_extent(s - i0, kTile), nj = clamp_extent(s - j0, kTile);
  const bool i_below = it > step, j_below = jt > step;
  double* a = gram + blk.offset;
  double* ys = dev::dynamic_smem<double>();  // Y_i: i_below ? [r][c] : [c][r]
  double* vs = ys + kTile * kLd;             // V_j: j_below ? [c][r'] : [r'][c]
  // Y_i(r, c) = A[max][min] and V_j(r', c) = A[min][max] of (p, q) = (row, k0 + c).
  if (i_below)
    stage_window(ys, a, s, i0, k0, ni, nk, false);
  else
    stage_window(ys, a, s, k0, i0, nk, ni, false);
  if (j_below)
    stage_window(vs, a, s, k0, j0, nk, nj, false);
  else
    stage_window(vs, a, s, j0, k0, nj, nk, false);
  dev::cp_async_commit();

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int m0 = (warp >> 1) * 32, n0 = (warp & 1) * 32;
  double acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = m0 + dev::acc_row(i, e), c = n0 + dev::acc_col(j, e);
        acc[i][j][e] = (r < ni && c < nj) ? -a[(i0 + r) * s + j0 + c] : 0.0;
      }
  dev::cp_async_wait<0>();
  __syncthreads();
  // A(m = r, k = c) of Y_i; B(k = c, n = r') of V_j^T.
  dev::warp_mma<kNative, 2, 4>(acc, ys, i_below ? 1 : kLd, i_below ? kLd : 1, vs,
                               j_below ? kLd : 1, j_below ? 1 : kLd, m0, n0, (nk + 3) & ~3);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = m0 + dev::acc_row(i, e), c = n0 + dev::acc_col(j, e);
        if (r < ni && c < nj && (it > jt || r >= c)) a[(i0 + r) * s + j0 + c] = -acc[i][j][e];
      }
}

// Step K, CTA per (active block, row tile i != K): the stored cross tile <- its mirror (V_i).
__global__ void __launch_bounds__(kThreads)
    sweep_copyback_kernel(double* __restrict__ gram,            // packed [sum size_b^2]
                          const int64_t* __restrict__ layout,   // [num_blocks, 3]
                          const int64_t* __restrict__ order,  // [ranked]
                          const __grid_constant__ ClassTable table, int step,
                          const int64_t* __restrict__ info) {   // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t s = blk.size, k0 = static_cast<int64_t>(step) * kTile;
  const int nk = clamp_extent(s - k0, kTile);
  const int it = static_cast<int>(w.index) + (w.index >= step ? 1 : 0);
  const int64_t i0 = static_cast<int64_t>(it) * kTile;
  const int ni = clamp_extent(s - i0, kTile);
  // Source (u, v) at A[u0 + u][v0 + v] (upper: the mirror), destination A[v0 + v][u0 + u].
  const bool below = it > step;
  const int64_t u0 = below ? k0 : i0, v0 = below ? i0 : k0;
  const int nu = below ? nk : ni, nv = below ? ni : nk;
  double* a = gram + blk.offset;
  double* tile = dev::dynamic_smem<double>();  // [kTile][kTile + 1]
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int u = e / kTile, v = e % kTile;
    if (u < nu && v < nv) tile[u * (kTile + 1) + v] = a[(u0 + u) * s + v0 + v];
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int v = e / kTile, u = e % kTile;
    if (u < nu && v < nv) a[(v0 + v) * s + u0 + u] = tile[u * (kTile + 1) + v];
  }
}

// out_b = -A_b in T, both triangles from the lower one (CTA per (block, tile (ti, tj))).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sweep_finalize_kernel(const double* __restrict__ gram,       // packed [sum size_b^2]
                          const int64_t* __restrict__ layout,    // [num_blocks, 3]
                          const int64_t* __restrict__ order,  // [ranked]
                          const __grid_constant__ ClassTable table,
                          T* __restrict__ out,                 // packed [sum size_b^2]
                          const int64_t* __restrict__ info) {  // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t s = blk.size;
  const int ti = static_cast<int>(w.index / w.tiles), tj = static_cast<int>(w.index % w.tiles);
  double* tile = dev::dynamic_smem<double>();  // [kTile][kTile + 1]: the stored (lower) tile
  const int si = ti > tj ? ti : tj, sj = ti > tj ? tj : ti;
  const double* a = gram + blk.offset;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = static_cast<int64_t>(si) * kTile + r, j = static_cast<int64_t>(sj) * kTile + c;
    tile[r * (kTile + 1) + c] = (i < s && j <= i) ? a[i * s + j] : 0.0;
  }
  __syncthreads();
  T* o = out + blk.offset;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = static_cast<int64_t>(ti) * kTile + r, j = static_cast<int64_t>(tj) * kTile + c;
    if (i >= s || j >= s) continue;
    const bool stored = ti > tj || (ti == tj && r >= c);
    o[i * s + j] = static_cast<T>(-(stored ? tile[r * (kTile + 1) + c] : tile[c * (kTile + 1) + r]));
  }
}

}  // namespace

size_t inverse_from_gram_workspace_bytes(const int64_t* layout_host, int64_t num_blocks) {
  if (num_blocks <= 0) return 0;
  return Plan(layout_host, num_blocks, Keying::kSweep).workspace_bytes();
}

template <typename T>
void inverse_from_gram(double* gram, const int64_t* layout_host, const int64_t* layout_dev,
                       int64_t num_blocks, double damping, double normalizer, T* out,
                       int64_t* info, void* work, size_t work_bytes, cudaStream_t stream) {
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  const Plan plan(layout_host, num_blocks, Keying::kSweep);
  if (plan.empty()) return;
  const int64_t* order = plan.build(layout_dev, num_blocks, work, work_bytes, stream);
  auto all = [](int) { return true; };
  auto lower = [](int t) -> int64_t { return static_cast<int64_t>(t) * (t + 1) / 2; };
  const size_t tile_smem = sizeof(double) * kTile * (kTile + 1);

  for (const auto& [table, n] : plan.tables(lower, all))
    dev::launch(sweep_prepare_kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0, stream,
                gram, layout_dev, order, table, damping, 1.0 / normalizer);
  for (int step = 0; step < plan.max_key(); ++step) {
    auto active = [step](int t) { return t > step; };
    const int64_t blocks = plan.count(active);
    if (blocks == 0) break;
    dev::launch(sweep_pivot_kernel, dim3(detail::grid_dim(blocks, "active blocks", INT32_MAX)),
                dim3(kThreads), kPivotSmem, stream, gram, layout_dev, order, step, info);
    auto others = [](int t) -> int64_t { return t - 1; };
    auto pairs = [](int t) -> int64_t { return static_cast<int64_t>(t) * (t - 1) / 2; };
    for (const auto& [table, n] : plan.tables(others, active))
      dev::launch(sweep_panel_kernel<true>, dim3(static_cast<unsigned>(n)), dim3(kMmaThreads),
                  kMmaSmem, stream, gram, layout_dev, order, table, step,
                  static_cast<const int64_t*>(info));
    for (const auto& [table, n] : plan.tables(pairs, active))
      dev::launch(sweep_update_kernel<true>, dim3(static_cast<unsigned>(n)), dim3(kMmaThreads),
                  kMmaSmem, stream, gram, layout_dev, order, table, step,
                  static_cast<const int64_t*>(info));
    for (const auto& [table, n] : plan.tables(others, active))
      dev::launch(sweep_copyback_kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), tile_smem,
                  stream, gram, layout_dev, order, table, step, static_cast<const int64_t*>(info));
  }
  auto square = [](int t) -> int64_t { return static_cast<int64_t>(t) * t; };
  for (const auto& [table, n] : plan.tables(square, all))
    dev::launch(sweep_finalize_kernel<T>, dim3(static_cast<unsigned>(n)), dim3(kThreads),
                tile_smem, stream, static_cast<const double*>(gram), layout_dev, order, table, out,
                static_cast<const int64_t*>(info));
}

template void inverse_from_gram<float>(double*, const int64_t*, const int64_t*, int64_t, double,
                                       double, float*, int64_t*, void*, size_t, cudaStream_t);
template void inverse_from_gram<double>(double*, const int64_t*, const int64_t*, int64_t, double,
                                        double, double*, int64_t*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda::tc
