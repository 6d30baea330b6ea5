// The chunked (Woodbury) update on float64 tensor cores: the same recurrence as
// sherman_morrison.cu's sherman_morrison_chunk, in rank-64 sub-chunks G_t,
//   C_t = N I + sign G_t U_t = L L^T,  W_t = U_t L^{-T},
//   F^{-1} <- F^{-1} - sign W_t W_t^T,  U_{t+1} = F^{-1} G_{t+1}^T,
// with every product on DMMA in float64 (also for float32 blocks, which are rounded once per
// sub-chunk) and U, W kept in float64.
//
// The fused pass: one CTA (8 warps, 32 x 16 warp tiles) per (block, 64-row panel i) walks the
// column tiles j of its panel: F(i, j) - sign W_i W_j^T (DMMA, written back), then
// U_{t+1}(i) += F_new(i, j) G_{t+1}(:, j)^T (DMMA, in registers), with W_j and G_{t+1}(:, j) of
// tile j + 1 arriving by cp.async (float32 gradients: through registers, converted) and F(i, j + 1)
// loading into registers while tile j is multiplied. At the end the CTA writes U_{t+1}(i) and the
// panel's share of the next capacitance, G_{t+1}(:, i) U_{t+1}(i) (DMMA), to its own slot; a
// factor kernel sums a block's slots in a fixed order (deterministic). So F^{-1} is read and
// written once per sub-chunk. The rank-64 term uses the same products in the same order for (r, c)
// and (c, r), so a symmetric F^{-1} stays bitwise symmetric.
//
// Blocks are processed in groups of consecutive table rows whose workspace (U, W: 1 KiB per
// parameter; capacitance slots and factors: 32 KiB per 64-row panel and per block) fits in
// 512 MiB, so the extra memory of an update stays bounded whatever the model size.
#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "dense.cuh"
#include "device.cuh"
#include "plan.cuh"
#include "sherman_morrison.cuh"
#include "tile.cuh"

namespace ssse::cuda::tc {

namespace {
using detail::Block;
using detail::clamp_extent;
using detail::load_block;

constexpr int kLd = kTile + 4;          // = 4 (mod 16) doubles
constexpr int kPassThreads = 256;       // 8 warps: 2 x 4 warp tiles of 32 x 16
constexpr int kThreads = 128;           // W kernel: 2 x 2 warp tiles of 32 x 32
constexpr int kFactorThreads = 256;
constexpr int kTileElems = kTile * kLd;
// Wi, Wj[2], Gs[2], Fs
constexpr size_t kPassSmem = sizeof(double) * 6 * kTileElems;
constexpr size_t kWSmem = sizeof(double) * 2 * kTileElems;
constexpr size_t kFactorSmem = sizeof(double) * 2 * kTile * detail::kLdSmall + 16;
constexpr size_t kTileBytes = sizeof(double) * kTile * kTile;
// Workspace of one group of blocks; SSSE_CUDA_WOODBURY_WORKSPACE_CAP (bytes) lowers it for tests.
size_t workspace_cap() {
  const char* env = std::getenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP");
  if (env != nullptr && *env != '\0') return static_cast<size_t>(std::strtoull(env, nullptr, 10));
  return size_t(512) << 20;
}

// Gradient tile: dst[q * kLd + c] = x[q * d + col + c] for q < rows, c < cols, else 0 (float64:
// cp.async; the caller commits). 256 threads.
__device__ __forceinline__ void issue_grad_tile(double* __restrict__ dst,
                                                const double* __restrict__ x, int64_t d,
                                                int64_t col, int rows, int cols) {
#pragma unroll 4
  for (int u = 0; u < kTile * kTile / kPassThreads; ++u) {
    const int e = static_cast<int>(threadIdx.x) + u * kPassThreads;
    const int q = e >> 6, c = e & (kTile - 1);
    const bool ok = q < rows && c < cols;
    dev::cp_async_8(dst + q * kLd + c, ok ? x + q * d + col + c : x, ok ? 8 : 0);
  }
}

struct GradRegs {
  float v[kTile * kTile / kPassThreads];
};

__device__ __forceinline__ void fetch_grad_tile(GradRegs& r, const float* __restrict__ x, int64_t d,
                                                int64_t col, int rows, int cols) {
#pragma unroll
  for (int u = 0; u < kTile * kTile / kPassThreads; ++u) {
    const int e = static_cast<int>(threadIdx.x) + u * kPassThreads;
    const int q = e >> 6, c = e & (kTile - 1);
    r.v[u] = (q < rows && c < cols) ? dev::load_ro(x + q * d + col + c) : 0.f;
  }
}

__device__ __forceinline__ void store_grad_tile(double* __restrict__ dst, const GradRegs& r) {
#pragma unroll
  for (int u = 0; u < kTile * kTile / kPassThreads; ++u) {
    const int e = static_cast<int>(threadIdx.x) + u * kPassThreads;
    dst[(e >> 6) * kLd + (e & (kTile - 1))] = r.v[u];
  }
}

// dst[q * kLd + c] = w[q * ldw + col + c] for c < cols, q < kTile, else 0 (cp.async, 256 threads).
__device__ __forceinline__ void issue_panel(double* __restrict__ dst, const double* __restrict__ w,
                                            int64_t ldw, int64_t col, int cols, int nthreads) {
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += nthreads) {
    const int q = e >> 6, c = e & (kTile - 1);
    const bool ok = c < cols;
    dev::cp_async_8(dst + q * kLd + c, ok ? w + q * ldw + col + c : w, ok ? 8 : 0);
  }
}

template <typename T, bool kUpdate, bool kNext>
__global__ void __launch_bounds__(kPassThreads, 1)
    woodbury_pass_kernel(T* __restrict__ inv,                  // packed [sum size_b^2]
                         const int64_t* __restrict__ layout,   // [num_blocks, 3] (the group)
                         const int64_t* __restrict__ order,    // [ranked]
                         const __grid_constant__ ClassTable table,
                         int64_t base,                         // position 0 of the group
                         const double* __restrict__ wt,        // [kTile, ldw]: W_t^T
                         double* __restrict__ ut,              // [kTile, ldw]: U_{t+1}^T
                         int64_t ldw,
                         const T* __restrict__ x,              // [m_next, d]: G_{t+1}
                         int64_t d, int m_next,
                         double* __restrict__ part,            // [slots, kTile, kTile]
                         double sign,
                         const int64_t* __restrict__ info) {   // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t s = blk.size, pos = blk.start - base;
  const int tiles = w.tiles;
  const int64_t i0 = w.index * kTile;
  const int ni = clamp_extent(s - i0, kTile);
  T* f = inv + blk.offset;
  double* smem = dev::dynamic_smem<double>();
  double* wi = smem;                        // [q][r]: W_i^T
  double* wj = smem + kTileElems;           // [2][q][c]: W_j^T
  double* gs = smem + 3 * kTileElems;       // [2][q][c]: G_{t+1}(:, tile j)
  double* fs = smem + 5 * kTileElems;       // [r][c]: F_new(i, j)
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int m0 = (warp >> 2) * 32, n0 = (warp & 3) * 16;
  // The rank-m term as -((-F) + W_i W_j^T) for sign = +1: no scaled operand.
  const bool negate = sign > 0;

  double acc[2][2][4], accu[2][2][4];
  T fr[2][2][4];  // F(i, j) of the next tile, in accumulator positions
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) accu[a][b][e] = 0.0;
  GradRegs gr;

  auto load_f = [&](int64_t j0, int nj) {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = m0 + dev::acc_row(a, e), c = n0 + dev::acc_col(b, e);
          fr[a][b][e] = (r < ni && c < nj) ? dev::load_stream(f + (i0 + r) * s + j0 + c) : T(0);
        }
  };
  auto stage = [&](int j, int buf) {  // tile j's W_j and G_{t+1}(:, j) into buffer buf
    const int64_t j0 = static_cast<int64_t>(j) * kTile;
    const int nj = clamp_extent(s - j0, kTile);
    if (kUpdate) issue_panel(wj + buf * kTileElems, wt, ldw, pos + j0, nj, kPassThreads);
    if constexpr (kNext) {
      if constexpr (sizeof(T) == 8)
        issue_grad_tile(gs + buf * kTileElems, reinterpret_cast<const double*>(x), d,
                        blk.start + j0, m_next, nj);
      else
        fetch_grad_tile(gr, reinterpret_cast<const float*>(x), d, blk.start + j0, m_next, nj);
    }
  };

  if (kUpdate) issue_panel(wi, wt, ldw, pos + i0, ni, kPassThreads);
  stage(0, 0);
  dev::cp_async_commit();
  load_f(0, clamp_extent(s, kTile));

  for (int j = 0; j < tiles; ++j) {
    const int64_t j0 = static_cast<int64_t>(j) * kTile;
    const int nj = clamp_extent(s - j0, kTile);
    const int buf = j & 1;
    dev::cp_async_wait<0>();  // this thread's copies of tile j
    if constexpr (kNext && sizeof(T) == 4) store_grad_tile(gs + buf * kTileElems, gr);
    __syncthreads();  // tile j visible; everyone is done with tile j - 1 (buffer buf ^ 1, fs)
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const double v = static_cast<double>(fr[a][b][e]);
          acc[a][b][e] = (kUpdate && negate) ? -v : v;
        }
    if (j + 1 < tiles) {
      stage(j + 1, buf ^ 1);
      load_f(j0 + kTile, clamp_extent(s - j0 - kTile, kTile));
    }
    dev::cp_async_commit();
    if constexpr (kUpdate) {
      // acc += W_i W_j^T: A(m = r, k = q) = wi[q][r], B(k = q, n = c) = wj[q][c].
      dev::warp_mma<true, 2, 2>(acc, wi, kLd, 1, wj + buf * kTileElems, kLd, 1, m0, n0, kTile);
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = m0 + dev::acc_row(a, e), c = n0 + dev::acc_col(b, e);
          const double v = (kUpdate && negate) ? -acc[a][b][e] : acc[a][b][e];
          const bool in = r < ni && c < nj;
          if (kUpdate && in) f[(i0 + r) * s + j0 + c] = static_cast<T>(v);
          if (kNext) fs[r * kLd + c] = in ? v : 0.0;
        }
    if constexpr (kNext) {
      __syncthreads();  // fs complete
      // U(i) += F_new(i, j) G(:, j)^T: A(m = r, k = c) = fs[r][c], B(k = c, n = q) = gs[q][c].
      dev::warp_mma<true, 2, 2>(accu, fs, 1, kLd, gs + buf * kTileElems, 1, kLd, m0, n0, kTile);
    }
  }
  dev::cp_async_wait<0>();

  if constexpr (kNext) {
    // U_{t+1}(i) -> ut; the panel's capacitance share G(:, i) U(i) -> part[slot].
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = m0 + dev::acc_row(a, e), q = n0 + dev::acc_col(b, e);
          if (r < ni) ut[q * ldw + pos + i0 + r] = accu[a][b][e];
        }
    __syncthreads();  // everyone is done with fs and gs
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = m0 + dev::acc_row(a, e), q = n0 + dev::acc_col(b, e);
          fs[r * kLd + q] = accu[a][b][e];  // U(r, q)
        }
    if constexpr (sizeof(T) == 8) {
      issue_grad_tile(gs, reinterpret_cast<const double*>(x), d, blk.start + i0, m_next, ni);
      dev::cp_async_commit();
      dev::cp_async_wait<0>();
    } else {
      fetch_grad_tile(gr, reinterpret_cast<const float*>(x), d, blk.start + i0, m_next, ni);
      store_grad_tile(gs, gr);
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.0;
    // P(q, q') = sum_r G(q, r) U(r, q'): A(m = q, k = r) = gs[q][r], B(k = r, n = q') = fs[r][q'].
    dev::warp_mma<true, 2, 2>(acc, gs, 1, kLd, fs, kLd, 1, m0, n0, kTile);
    double* out = part + w.slot * (kTile * kTile);
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          out[(m0 + dev::acc_row(a, e)) * kTile + n0 + dev::acc_col(b, e)] = acc[a][b][e];
  }
}

// C = N I + sign (sum of the block's panel shares, in panel order), symmetrised; L^{-1} of its
// Cholesky factor to linv[rank]. A C that is not positive definite sets info[b] = row0 + pivot.
__global__ void __launch_bounds__(kFactorThreads)
    woodbury_factor_kernel(const int64_t* __restrict__ order,   // [ranked]
                           const __grid_constant__ ClassTable table,
                           const double* __restrict__ part,  // [slots, kTile, kTile]
                           double normalizer, double sign, int64_t row0,
                           double* __restrict__ linv_all,    // [ranked, kTile, kTile]
                           int64_t* __restrict__ info) {     // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  double* smem = dev::dynamic_smem<double>();
  double* c = smem;                                // [kTile][kLdSmall]
  double* linv = smem + kTile * detail::kLdSmall;  // [kTile][kLdSmall]
  int* status = reinterpret_cast<int*>(smem + 2 * kTile * detail::kLdSmall);
  // The block's panels are slots aux + nth * tiles + [0, tiles) of the pass.
  const double* p0 = part + (w.aux + w.nth * w.tiles) * (kTile * kTile);
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kFactorThreads) {
    const int i = e / kTile, j = e % kTile;
    double sij = 0.0, sji = 0.0;
    for (int p = 0; p < w.tiles; ++p) {
      sij += p0[p * kTile * kTile + i * kTile + j];
      sji += p0[p * kTile * kTile + j * kTile + i];
    }
    c[i * detail::kLdSmall + j] = (i == j ? normalizer : 0.0) + sign * 0.5 * (sij + sji);
  }
  __syncthreads();
  const int code = detail::cholesky_smem(c, status);
  if (code != 0) {
    if (threadIdx.x == 0) info[w.block] = row0 + code;
    return;
  }
  detail::lower_inverse_smem(c, linv);
  double* out = linv_all + w.rank * (kTile * kTile);
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kFactorThreads)
    out[e] = linv[(e / kTile) * detail::kLdSmall + e % kTile];
}

// W_t^T(:, panel i) = L^{-1} U_t^T(:, panel i) (CTA per (block, panel); DMMA).
__global__ void __launch_bounds__(kThreads)
    woodbury_w_kernel(const int64_t* __restrict__ layout,   // [num_blocks, 3]
                      const int64_t* __restrict__ order,    // [ranked]
                      const __grid_constant__ ClassTable table, int64_t base,
                      const double* __restrict__ linv_all,  // [ranked, kTile, kTile]
                      const double* __restrict__ ut,        // [kTile, ldw]
                      double* __restrict__ wt,              // [kTile, ldw]
                      int64_t ldw,
                      const int64_t* __restrict__ info) {   // [num_blocks]
  const WorkItem w = find_work(table, order, blockIdx.x);
  if (info[w.block] != 0) return;
  const Block blk = load_block(layout, w.block);
  const int64_t pos = blk.start - base + w.index * kTile;
  const int ni = clamp_extent(blk.size - w.index * kTile, kTile);
  double* ls = dev::dynamic_smem<double>();  // [q][p]: L^{-1}
  double* us = ls + kTileElems;              // [p][r]: U^T(p, panel row r)
  const double* linv = linv_all + w.rank * (kTile * kTile);
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads)
    dev::cp_async_8(ls + (e >> 6) * kLd + (e & (kTile - 1)), linv + e, 8);
  issue_panel(us, ut, ldw, pos, ni, kThreads);
  dev::cp_async_commit();
  dev::cp_async_wait<0>();
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int m0 = (warp >> 1) * 32, n0 = (warp & 1) * 32;
  double acc[2][4][4] = {};
  // A(m = q, k = p) = ls[q][p], B(k = p, n = r) = us[p][r].
  dev::warp_mma<true, 2, 4>(acc, ls, 1, kLd, us, kLd, 1, m0, n0, kTile);
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = m0 + dev::acc_row(a, e), r = n0 + dev::acc_col(b, e);
        if (r < ni) wt[q * ldw + pos + r] = acc[a][b][e];
      }
}

// ---- host side ----------------------------------------------------------------------------------

// Workspace of one group of table rows [b0, b1), laid out from the start of the workspace.
struct GroupSpace {
  int64_t base = 0, ldw = 0;  // positions
  size_t ut = 0, wt = 0, linv = 0, part = 0, plan = 0, bytes = 0;  // byte offsets, total
};

GroupSpace group_space(const int64_t* layout_host, int64_t b0, int64_t b1) {
  GroupSpace g;
  int64_t lo = INT64_MAX, hi = 0, ranked = 0, slots = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = layout_host[3 * b], size = layout_host[3 * b + 1];
    if (size <= 0) continue;
    lo = std::min(lo, start);
    hi = std::max(hi, start + size);
    ++ranked;
    slots += tiles_of(size, kTile);
  }
  if (ranked == 0) return g;
  g.base = lo;
  g.ldw = hi - lo;
  const size_t panel = detail::section_bytes(sizeof(double) * kTile * static_cast<size_t>(g.ldw));
  g.ut = 0;
  g.wt = panel;
  g.linv = 2 * panel;
  g.part = g.linv + detail::section_bytes(kTileBytes * static_cast<size_t>(ranked));
  g.plan = g.part + detail::section_bytes(kTileBytes * static_cast<size_t>(slots));
  g.bytes = g.plan + Plan(layout_host + 3 * b0, b1 - b0, Keying::kSweep).workspace_bytes();
  return g;
}

// Consecutive table rows in groups whose workspace fits in workspace_cap() (or single blocks).
std::vector<std::pair<int64_t, int64_t>> groups_of(const int64_t* layout_host, int64_t num_blocks) {
  const size_t cap = workspace_cap();
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t b0 = 0;
  while (b0 < num_blocks) {
    int64_t b1 = b0 + 1;
    // Grow by doubling, then settle: the workspace grows monotonically with the group.
    int64_t step = 1;
    while (b1 < num_blocks) {
      const int64_t next = std::min(num_blocks, b1 + step);
      if (group_space(layout_host, b0, next).bytes > cap) {
        if (step == 1) break;
        step = 1;
        continue;
      }
      b1 = next;
      step *= 2;
    }
    out.emplace_back(b0, b1);
    b0 = b1;
  }
  return out;
}

template <typename T, bool kUpdate, bool kNext>
void launch_pass(const Plan& plan, const int64_t* order, cudaStream_t stream, T* inv,
                 const int64_t* layout, int64_t base, const double* wt, double* ut, int64_t ldw,
                 const T* x, int64_t d, int m_next, double* part, int sign, const int64_t* info) {
  auto panels = [](int t) -> int64_t { return t; };
  for (const auto& [table, n] : plan.tables(panels, [](int) { return true; }))
    dev::launch(woodbury_pass_kernel<T, kUpdate, kNext>, dim3(static_cast<unsigned>(n)),
                dim3(kPassThreads), kPassSmem, stream, inv, layout, order, table, base, wt, ut,
                ldw, x, d, m_next, part, static_cast<double>(sign), info);
}

}  // namespace

size_t sherman_morrison_chunk_workspace_bytes(const int64_t* layout_host, int64_t num_blocks) {
  size_t bytes = 0;
  for (const auto& [b0, b1] : groups_of(layout_host, num_blocks))
    bytes = std::max(bytes, group_space(layout_host, b0, b1).bytes);
  return bytes;
}

template <typename T>
void sherman_morrison_chunk(T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                            int64_t num_blocks, const T* grads, int64_t m, int64_t d,
                            double normalizer, int sign, int64_t* info, void* work,
                            size_t work_bytes, cudaStream_t stream) {
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  if (m <= 0) return;
  const int64_t chunks = (m + kTile - 1) / kTile;
  auto rows_of = [&](int64_t t) { return static_cast<int>(std::min<int64_t>(kTile, m - t * kTile)); };
  for (const auto& [b0, b1] : groups_of(layout_host, num_blocks)) {
    const GroupSpace g = group_space(layout_host, b0, b1);
    if (g.bytes == 0) continue;
    if (work_bytes < g.bytes)
      throw std::invalid_argument("work must hold " + std::to_string(g.bytes) + " bytes, got " +
                                  std::to_string(work_bytes));
    char* wb = static_cast<char*>(work);
    double* ut = reinterpret_cast<double*>(wb + g.ut);
    double* wt = reinterpret_cast<double*>(wb + g.wt);
    double* linv = reinterpret_cast<double*>(wb + g.linv);
    double* part = reinterpret_cast<double*>(wb + g.part);
    const int64_t* lay_h = layout_host + 3 * b0;
    const int64_t* lay_d = layout_dev + 3 * b0;
    int64_t* inf = info + b0;
    const int64_t nb = b1 - b0;
    const Plan plan(lay_h, nb, Keying::kSweep);
    const int64_t* order = plan.build(lay_d, nb, wb + g.plan, g.bytes - g.plan, stream);
    auto panels = [](int t) -> int64_t { return t; };
    auto all = [](int) { return true; };
    auto one = [](int) -> int64_t { return 1; };
    // A block's capacitance slots start at (slots of the classes before it) + nth * tiles.
    auto slot_base = [&](const HostClass& c, int64_t done) -> int64_t {
      return plan.items_before(c, panels, all) + done * c.key;
    };
    const auto factor_tables = plan.tables(one, all, slot_base);
    const auto panel_tables = plan.tables(panels, all);

    launch_pass<T, false, true>(plan, order, stream, inv, lay_d, g.base, wt, ut, g.ldw, grads, d,
                                rows_of(0), part, sign, inf);
    for (int64_t t = 0; t < chunks; ++t) {
      for (const auto& [table, n] : factor_tables)
        dev::launch(woodbury_factor_kernel, dim3(static_cast<unsigned>(n)), dim3(kFactorThreads),
                    kFactorSmem, stream, order, table, static_cast<const double*>(part),
                    normalizer, static_cast<double>(sign), t * kTile, linv, inf);
      for (const auto& [table, n] : panel_tables)
        dev::launch(woodbury_w_kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), kWSmem,
                    stream, lay_d, order, table, g.base, static_cast<const double*>(linv),
                    static_cast<const double*>(ut), wt, g.ldw, static_cast<const int64_t*>(inf));
      if (t + 1 < chunks)
        launch_pass<T, true, true>(plan, order, stream, inv, lay_d, g.base, wt, ut, g.ldw,
                                   grads + (t + 1) * kTile * d, d, rows_of(t + 1), part, sign,
                                   inf);
      else
        launch_pass<T, true, false>(plan, order, stream, inv, lay_d, g.base, wt, ut, g.ldw,
                                    static_cast<const T*>(nullptr), d, 0, part, sign, inf);
    }
  }
}

template void sherman_morrison_chunk<float>(float*, const int64_t*, const int64_t*, int64_t,
                                            const float*, int64_t, int64_t, double, int,
                                            int64_t*, void*, size_t, cudaStream_t);
template void sherman_morrison_chunk<double>(double*, const int64_t*, const int64_t*, int64_t,
                                             const double*, int64_t, int64_t, double, int,
                                             int64_t*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda::tc
