// Woodbury and rank-1 kernels. The fused pass keeps a row panel of F^{-1} per thread block:
// for every column tile it loads F(panel, tile), applies -sign W_panel W_tile^T from shared
// memory, writes the tile back and multiplies it by the next sub-chunk's gradients, so the
// panel's rows of U_{t+1} stay in registers and F^{-1} is read and written once per sub-chunk.
// The rank-m term is computed with the same products in the same order for (i, j) and (j, i),
// so a symmetric F^{-1} stays exactly symmetric.
#include "common.cuh"
#include "dense.cuh"
#include "sherman_morrison.cuh"
#include "tile.cuh"

namespace ssse::cuda {

namespace {
using namespace detail;

// Register blocking of the fused pass: 8 x 8 for float (64 threads per panel), 4 x 4 for double
// (256 threads), which keeps both accumulator tiles in registers without spilling.
template <typename T>
constexpr int pass_tm() {
  return sizeof(T) == 4 ? 8 : 4;
}
constexpr int kSmallTM = 4;  // the float64 side GEMMs (capacitance partials, W)
using SmallMicro = Micro<kSmallTM>;
// Rows of a block summed by one capacitance-partial thread block.
constexpr int kPartRows = 256;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Slot of partial p of block b in the capacitance workspace: distinct over all (b, p), fewer
// than num_blocks + d / kPartRows + 1, whatever the block sizes.
__host__ __device__ inline int64_t part_slot(int64_t b, int64_t start, int64_t p) {
  return b + start / kPartRows + p;
}

template <typename T, int TM, bool kUpdate, bool kNext>
__global__ void __launch_bounds__(Micro<TM>::kThreads)
    woodbury_pass_kernel(T* __restrict__ inv,                 // packed [sum size_b^2]
                         const int64_t* __restrict__ layout,  // [num_blocks, 3]
                         const T* __restrict__ wt,            // [kTile, ldw]: W_t^T
                         int64_t ldw,
                         const T* __restrict__ x,             // [m_next, d]: G_{t+1}^T rows
                         int64_t d, int m_next,
                         T* __restrict__ ut,                  // [kTile, ldw]: U_{t+1}^T
                         T neg_sign, const int64_t* __restrict__ info) {
  using M = Micro<TM>;
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t s = blk.size, i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  if (i0 >= s || info[b] != 0) return;
  const int rows_i = clamp_extent(s - i0);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* fs = reinterpret_cast<T*>(smem_raw);  // [kTile][kLd]: fs[c][r] = F(i0 + r, j0 + c)
  T* sb = fs + kTile * kLd;                // [kSlice][kLd]: operand slice
  T* wi = sb + kSlice * kLd;               // [kTile][kLd]: -sign W_t^T of the panel
  const int tx = threadIdx.x % M::kStride, ty = threadIdx.x / M::kStride;
  T* f = inv + blk.offset;
  if (kUpdate) {
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int q = e / kTile, r = e % kTile;
      wi[q * kLd + r] = r < rows_i ? neg_sign * wt[q * ldw + blk.start + i0 + r] : T(0);
    }
  }
  T accu[TM][TM] = {};  // U_{t+1}^T(:, panel): rows = gradient q, columns = panel row
  const int64_t tiles = ceil_div(s, kTile);
  for (int64_t jt = 0; jt < tiles; ++jt) {
    const int64_t j0 = jt * kTile;
    const int cols_j = clamp_extent(s - j0);
    // One pointer walked down the rows keeps the address arithmetic out of the registers that
    // the two accumulator tiles need.
    const int64_t row_step = static_cast<int64_t>(M::kStride) * s;
    T acc[TM][TM];
    {
      const T* p = f + (i0 + ty) * s + j0 + tx;
#pragma unroll
      for (int a = 0; a < TM; ++a, p += row_step) {
        const bool row_ok = ty + M::kStride * a < rows_i;
#pragma unroll
        for (int c = 0; c < TM; ++c)
          acc[a][c] = (row_ok && tx + M::kStride * c < cols_j) ? p[M::kStride * c] : T(0);
      }
    }
    if (kUpdate) {
#pragma unroll 1
      for (int kk = 0; kk < kTile; kk += kSlice) {
        load_slice<M::kThreads>(sb, wt + kk * ldw + blk.start + j0, ldw, kSlice, cols_j);
        __syncthreads();
        tile_fma<TM>(acc, wi + kk * kLd, sb, tx, ty);
        __syncthreads();
      }
      T* p = f + (i0 + ty) * s + j0 + tx;
#pragma unroll
      for (int a = 0; a < TM; ++a, p += row_step) {
        const bool row_ok = ty + M::kStride * a < rows_i;
#pragma unroll
        for (int c = 0; c < TM; ++c)
          if (row_ok && tx + M::kStride * c < cols_j) p[M::kStride * c] = acc[a][c];
      }
    }
    if (kNext) {
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int c = 0; c < TM; ++c)
          fs[(tx + M::kStride * c) * kLd + ty + M::kStride * a] = acc[a][c];
      // The tile's contribution is summed in the (now free) F registers and then added to
      // U: blocked summation, so the rounding error grows with kTile + s / kTile, not with s.
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int c = 0; c < TM; ++c) acc[a][c] = T(0);
#pragma unroll 1
      for (int kk = 0; kk < kTile; kk += kSlice) {
        load_slice_t<M::kThreads>(sb, x + blk.start + j0 + kk, d, cols_j - kk, m_next);
        __syncthreads();
        tile_fma<TM>(acc, sb, fs + kk * kLd, tx, ty);
        __syncthreads();
      }
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int c = 0; c < TM; ++c) accu[a][c] += acc[a][c];
    }
  }
  if (kNext) {
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int q = ty + M::kStride * a;
#pragma unroll
      for (int c = 0; c < TM; ++c) {
        const int r = tx + M::kStride * c;
        if (r < rows_i) ut[q * ldw + blk.start + i0 + r] = accu[a][c];
      }
    }
  }
}

// Partial capacitance over kPartRows rows of block b: part = G_t(rows)^T U_t(rows), float64.
template <typename T>
__global__ void __launch_bounds__(SmallMicro::kThreads)
    woodbury_part_kernel(const int64_t* __restrict__ layout,
                         const T* __restrict__ x,   // [m_cur, d]
                         int64_t d, int m_cur,
                         const T* __restrict__ ut,  // [kTile, ldw]
                         int64_t ldw,
                         double* __restrict__ part,  // [slots, kTile, kTile]
                         const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kPartRows;
  if (r0 >= blk.size || info[b] != 0) return;
  const int rows = clamp_extent(blk.size - r0, kPartRows);
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % SmallMicro::kStride, ty = threadIdx.x / SmallMicro::kStride;
  double acc[kSmallTM][kSmallTM] = {};
  for (int kk = 0; kk < rows; kk += kSlice) {
    load_slice_t<SmallMicro::kThreads>(as, x + blk.start + r0 + kk, d, rows - kk, m_cur);
    load_slice_t<SmallMicro::kThreads>(bs, ut + blk.start + r0 + kk, ldw, rows - kk, kTile);
    __syncthreads();
    tile_fma<kSmallTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
  double* out = part + part_slot(b, blk.start, blockIdx.y) * kTile * kTile;
#pragma unroll
  for (int a = 0; a < kSmallTM; ++a)
#pragma unroll
    for (int c = 0; c < kSmallTM; ++c)
      out[(ty + SmallMicro::kStride * a) * kTile + tx + SmallMicro::kStride * c] = acc[a][c];
}

// C = N I + sign (sum of partials), symmetrised; its Cholesky factor's inverse goes to linv.
// A C that is not positive definite sets info[b] = row0 + pivot.
__global__ void __launch_bounds__(kThreads)
    woodbury_factor_kernel(const int64_t* __restrict__ layout,
                           const double* __restrict__ part,  // [slots, kTile, kTile]
                           double normalizer, double sign, int64_t row0,
                           double* __restrict__ linv_all,    // [num_blocks, kTile, kTile]
                           int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  if (blk.size == 0 || info[b] != 0) return;
  extern __shared__ double smem[];
  double* c = smem;                        // [kTile][kLdSmall]
  double* linv = smem + kTile * kLdSmall;  // [kTile][kLdSmall]
  __shared__ int status;
  const int64_t parts = ceil_div(blk.size, kPartRows);
  const double* p0 = part + part_slot(b, blk.start, 0) * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int i = e / kTile, j = e % kTile;
    double sij = 0.0, sji = 0.0;
    for (int64_t p = 0; p < parts; ++p) {
      sij += p0[p * kTile * kTile + i * kTile + j];
      sji += p0[p * kTile * kTile + j * kTile + i];
    }
    c[i * kLdSmall + j] = (i == j ? normalizer : 0.0) + sign * 0.5 * (sij + sji);
  }
  __syncthreads();
  const int code = cholesky_smem(c, &status);
  if (code != 0) {
    if (threadIdx.x == 0) info[b] = row0 + code;
    return;
  }
  lower_inverse_smem(c, linv);
  double* out = linv_all + b * kTile * kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x)
    out[e] = linv[(e / kTile) * kLdSmall + e % kTile];
}

// W_t^T = L^{-1} U_t^T for one 64-row panel of block b (float64 arithmetic, stored in T).
template <typename T>
__global__ void __launch_bounds__(SmallMicro::kThreads)
    woodbury_w_kernel(const int64_t* __restrict__ layout,
                      const double* __restrict__ linv_all,  // [num_blocks, kTile, kTile]
                      const T* __restrict__ ut,             // [kTile, ldw]
                      T* __restrict__ wt,                   // [kTile, ldw]
                      int64_t ldw, const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  if (i0 >= blk.size || info[b] != 0) return;
  const int rows_i = clamp_extent(blk.size - i0);
  __shared__ __align__(16) double as[kSlice * kLd];
  __shared__ __align__(16) double bs[kSlice * kLd];
  const int tx = threadIdx.x % SmallMicro::kStride, ty = threadIdx.x / SmallMicro::kStride;
  const double* linv = linv_all + b * kTile * kTile;
  double acc[kSmallTM][kSmallTM] = {};
#pragma unroll
  for (int kk = 0; kk < kTile; kk += kSlice) {
    load_slice_t<SmallMicro::kThreads>(as, linv + kk, kTile, kSlice, kTile);  // as[p][q] = L^{-1}(q, kk + p)
    load_slice<SmallMicro::kThreads>(bs, ut + kk * ldw + blk.start + i0, ldw, kSlice, rows_i);
    __syncthreads();
    tile_fma<kSmallTM>(acc, as, bs, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < kSmallTM; ++a) {
    const int q = ty + SmallMicro::kStride * a;
#pragma unroll
    for (int c = 0; c < kSmallTM; ++c) {
      const int r = tx + SmallMicro::kStride * c;
      if (r < rows_i) wt[q * ldw + blk.start + i0 + r] = static_cast<T>(acc[a][c]);
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// v = F^{-1} g for one gradient row: one warp per row of the block, T arithmetic.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rank1_matvec_kernel(const T* __restrict__ inv, const int64_t* __restrict__ layout,
                        const T* __restrict__ g,  // [d]: the gradient row
                        T* __restrict__ v,        // [ldw]
                        const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (i >= blk.size || info[b] != 0) return;
  const int lane = threadIdx.x % 32;
  const T* fi = inv + blk.offset + i * blk.size;
  const T* gb = g + blk.start;
  T acc = 0;
  for (int64_t j = lane; j < blk.size; j += 32) acc += fi[j] * gb[j];
  acc = warp_sum(acc);
  if (lane == 0) v[blk.start + i] = acc;
}

// den = N + sign g^T v; on success coef[b] = sign / den, else info[b] = row + 1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rank1_denominator_kernel(const int64_t* __restrict__ layout, const T* __restrict__ g,
                             const T* __restrict__ v, T normalizer, T sign, int64_t row,
                             T* __restrict__ coef, int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  if (info[b] != 0) return;
  T acc = 0;
  for (int64_t i = threadIdx.x; i < blk.size; i += blockDim.x)
    acc += g[blk.start + i] * v[blk.start + i];
  acc = warp_sum(acc);
  __shared__ T partial[kWarps];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    T gv = 0;
    for (int w = 0; w < kWarps; ++w) gv += partial[w];
    const T den = normalizer + sign * gv;
    if (!(den > T(0)) || !isfinite(den))
      info[b] = row + 1;
    else
      coef[b] = sign / den;
  }
}

// F^{-1} <- F^{-1} - coef v v^T, kWarps rows per thread block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rank1_update_kernel(T* __restrict__ inv, const int64_t* __restrict__ layout,
                        const T* __restrict__ v, const T* __restrict__ coef,
                        const int64_t* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const Block blk = load_block(layout, b);
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (i >= blk.size || info[b] != 0) return;
  const T* vb = v + blk.start;
  const T vi = coef[b] * vb[i];
  T* fi = inv + blk.offset + i * blk.size;
  for (int64_t j = threadIdx.x % 32; j < blk.size; j += 32) fi[j] -= vi * vb[j];
}

struct ChunkWorkspace {
  void* ut;        // T [kTile, ldw]
  void* wt;        // T [kTile, ldw]
  double* linv;    // [num_blocks, kTile, kTile]
  double* part;    // [slots, kTile, kTile]
  size_t bytes;
};

ChunkWorkspace chunk_workspace(void* base, size_t element_size, int64_t num_blocks,
                               int64_t ldw) {
  const size_t panel = section_bytes(element_size * kTile * ldw);
  const size_t linv = section_bytes(sizeof(double) * num_blocks * kTile * kTile);
  const int64_t slots = num_blocks + ldw / kPartRows + 1;
  const size_t part = section_bytes(sizeof(double) * slots * kTile * kTile);
  char* p = static_cast<char*>(base);
  return ChunkWorkspace{p, p + panel, reinterpret_cast<double*>(p + 2 * panel),
                        reinterpret_cast<double*>(p + 2 * panel + linv),
                        2 * panel + linv + part};
}

struct Rank1Workspace {
  void* v;     // T [ldw]
  void* coef;  // T [num_blocks]
  size_t bytes;
};

Rank1Workspace rank1_workspace(void* base, size_t element_size, int64_t num_blocks,
                               int64_t ldw) {
  const size_t v = section_bytes(element_size * ldw);
  const size_t coef = section_bytes(element_size * num_blocks);
  char* p = static_cast<char*>(base);
  return Rank1Workspace{p, p + v, v + coef};
}

void check_workspace(size_t have, size_t need) {
  if (have < need)
    throw std::invalid_argument("work must hold " + std::to_string(need) + " bytes, got " +
                                std::to_string(have));
}

template <typename T, bool kUpdate, bool kNext>
void launch_pass(dim3 grid, cudaStream_t stream, T* inv, const int64_t* layout, const T* wt,
                 int64_t ldw, const T* x, int64_t d, int m_next, T* ut, int sign,
                 const int64_t* info) {
  constexpr int tm = pass_tm<T>();
  const size_t smem = sizeof(T) * (2 * kTile + kSlice) * kLd;
  auto kernel = woodbury_pass_kernel<T, tm, kUpdate, kNext>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid, Micro<tm>::kThreads, smem, stream>>>(inv, layout, wt, ldw, x, d, m_next, ut,
                                                       static_cast<T>(-sign), info);
  SSSE_CUDA_CHECK_LAUNCH();
}

}  // namespace

size_t sherman_morrison_workspace_bytes(size_t element_size, bool chunked,
                                        const int64_t* layout_host, int64_t num_blocks) {
  if (num_blocks <= 0) return 0;
  const int64_t ldw = layout_extent(layout_host, num_blocks);
  return chunked ? chunk_workspace(nullptr, element_size, num_blocks, ldw).bytes
                 : rank1_workspace(nullptr, element_size, num_blocks, ldw).bytes;
}

template <typename T>
void sherman_morrison_rank1(T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                            int64_t num_blocks, const T* grads, int64_t m, int64_t d,
                            double normalizer, int sign, int64_t* info, void* work,
                            size_t work_bytes, cudaStream_t stream) {
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  const int64_t max_s = max_block_size(layout_host, num_blocks);
  if (m <= 0 || max_s == 0) return;
  const int64_t ldw = layout_extent(layout_host, num_blocks);
  const Rank1Workspace ws = rank1_workspace(work, sizeof(T), num_blocks, ldw);
  check_workspace(work_bytes, ws.bytes);
  T* v = static_cast<T*>(ws.v);
  T* coef = static_cast<T*>(ws.coef);
  const unsigned nb = grid_dim(num_blocks, "num_blocks", INT32_MAX);
  const dim3 rows(nb, grid_dim(ceil_div(max_s, kWarps), "row groups of the largest block"));
  for (int64_t r = 0; r < m; ++r) {
    const T* g = grads + r * d;
    rank1_matvec_kernel<T><<<rows, kThreads, 0, stream>>>(inv, layout_dev, g, v, info);
    SSSE_CUDA_CHECK_LAUNCH();
    rank1_denominator_kernel<T><<<nb, kThreads, 0, stream>>>(
        layout_dev, g, v, static_cast<T>(normalizer), static_cast<T>(sign), r, coef, info);
    SSSE_CUDA_CHECK_LAUNCH();
    rank1_update_kernel<T><<<rows, kThreads, 0, stream>>>(inv, layout_dev, v, coef, info);
    SSSE_CUDA_CHECK_LAUNCH();
  }
}

template <typename T>
void sherman_morrison_chunk(T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                            int64_t num_blocks, const T* grads, int64_t m, int64_t d,
                            double normalizer, int sign, int64_t* info, void* work,
                            size_t work_bytes, cudaStream_t stream) {
  if (num_blocks <= 0) return;
  DeviceGuard guard(info);
  SSSE_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int64_t) * num_blocks, stream));
  const int64_t max_s = max_block_size(layout_host, num_blocks);
  if (m <= 0 || max_s == 0) return;
  const int64_t ldw = layout_extent(layout_host, num_blocks);
  const ChunkWorkspace ws = chunk_workspace(work, sizeof(T), num_blocks, ldw);
  check_workspace(work_bytes, ws.bytes);
  T* ut = static_cast<T*>(ws.ut);
  T* wt = static_cast<T*>(ws.wt);
  const unsigned nb = grid_dim(num_blocks, "num_blocks", INT32_MAX);
  const dim3 panels(nb, grid_dim(ceil_div(max_s, kTile), "row panels of the largest block"));
  const dim3 parts(nb, grid_dim(ceil_div(max_s, kPartRows), "partials of the largest block"));
  const size_t factor_smem = sizeof(double) * 2 * kTile * kLdSmall;
  allow_dynamic_smem(woodbury_factor_kernel, factor_smem);
  const int64_t chunks = ceil_div(m, kTile);
  auto rows_of = [&](int64_t t) { return static_cast<int>(std::min<int64_t>(kTile, m - t * kTile)); };

  // U_0 = F^{-1} G_0 (a read-only pass) and its capacitance partials.
  launch_pass<T, false, true>(panels, stream, inv, layout_dev, wt, ldw, grads, d, rows_of(0), ut,
                              sign, info);
  woodbury_part_kernel<T><<<parts, SmallMicro::kThreads, 0, stream>>>(
      layout_dev, grads, d, rows_of(0), ut, ldw, ws.part, info);
  SSSE_CUDA_CHECK_LAUNCH();
  for (int64_t t = 0; t < chunks; ++t) {
    woodbury_factor_kernel<<<nb, kThreads, factor_smem, stream>>>(
        layout_dev, ws.part, normalizer, static_cast<double>(sign), t * kTile, ws.linv, info);
    SSSE_CUDA_CHECK_LAUNCH();
    woodbury_w_kernel<T><<<panels, SmallMicro::kThreads, 0, stream>>>(layout_dev, ws.linv, ut,
                                                                      wt, ldw, info);
    SSSE_CUDA_CHECK_LAUNCH();
    if (t + 1 < chunks) {
      const T* next = grads + (t + 1) * kTile * d;
      launch_pass<T, true, true>(panels, stream, inv, layout_dev, wt, ldw, next, d,
                                 rows_of(t + 1), ut, sign, info);
      woodbury_part_kernel<T><<<parts, SmallMicro::kThreads, 0, stream>>>(
          layout_dev, next, d, rows_of(t + 1), ut, ldw, ws.part, info);
      SSSE_CUDA_CHECK_LAUNCH();
    } else {
      launch_pass<T, true, false>(panels, stream, inv, layout_dev, wt, ldw, nullptr, d, 0,
                                  nullptr, sign, info);
    }
  }
}

template void sherman_morrison_rank1<float>(float*, const int64_t*, const int64_t*, int64_t,
                                            const float*, int64_t, int64_t, double, int,
                                            int64_t*, void*, size_t, cudaStream_t);
template void sherman_morrison_rank1<double>(double*, const int64_t*, const int64_t*, int64_t,
                                             const double*, int64_t, int64_t, double, int,
                                             int64_t*, void*, size_t, cudaStream_t);
template void sherman_morrison_chunk<float>(float*, const int64_t*, const int64_t*, int64_t,
                                            const float*, int64_t, int64_t, double, int,
                                            int64_t*, void*, size_t, cudaStream_t);
template void sherman_morrison_chunk<double>(double*, const int64_t*, const int64_t*, int64_t,
                                             const double*, int64_t, int64_t, double, int,
                                             int64_t*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda
