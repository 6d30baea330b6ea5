// out = base + scale * blockdiag(F^{-1}) v. Bandwidth-bound: F^{-1} is streamed once per group
// of kCols right-hand sides, one warp per row with coalesced loads; the block of v stays in L1/L2.
// Dot products accumulate in float64 (one DFMA per loaded element is far below the FP64 rate).
#include "apply.cuh"
#include "common.cuh"
#include "tile.cuh"

namespace ssse::cuda {

namespace {
using detail::Block;
using detail::load_block;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 4;  // right-hand sides per pass over F^{-1}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ inv,            // packed [sum size_b^2]
                 const int64_t* __restrict__ layout,   // [num_blocks, 3]
                 const T* __restrict__ v,              // [d, r]
                 int64_t r,
                 const T* base,                        // [d, r] or nullptr; may alias out
                 double scale,
                 T* out) {                             // [d, r]
  const Block blk = load_block(layout, blockIdx.x);
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (i >= blk.size) return;
  const int lane = threadIdx.x % 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kCols;
  const int nc = r - c0 < kCols ? static_cast<int>(r - c0) : kCols;
  const T* fi = inv + blk.offset + i * blk.size;
  const T* vb = v + blk.start * r + c0;
  double acc[kCols] = {};
  if (nc == 1) {
#pragma unroll 4
    for (int64_t j = lane; j < blk.size; j += 32)
      acc[0] = fma(static_cast<double>(fi[j]), static_cast<double>(vb[j * r]), acc[0]);
  } else {
#pragma unroll 2
    for (int64_t j = lane; j < blk.size; j += 32) {
      const double f = static_cast<double>(fi[j]);
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (c < nc) acc[c] = fma(f, static_cast<double>(vb[j * r + c]), acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
  if (lane < nc) {
    double sum = acc[0];
#pragma unroll
    for (int c = 1; c < kCols; ++c)
      if (lane == c) sum = acc[c];
    const int64_t idx = (blk.start + i) * r + c0 + lane;
    const double b0 = base != nullptr ? static_cast<double>(base[idx]) : 0.0;
    out[idx] = static_cast<T>(b0 + scale * sum);
  }
}
}  // namespace

template <typename T>
void apply_inverse(const T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                   int64_t num_blocks, const T* v, int64_t d, int64_t r, const T* base,
                   double scale, T* out, cudaStream_t stream) {
  if (d == 0 || r == 0 || num_blocks == 0) return;
  const int64_t max_size = detail::max_block_size(layout_host, num_blocks);
  if (max_size == 0) return;
  DeviceGuard guard(out);
  const dim3 grid(detail::grid_dim(num_blocks, "num_blocks", INT32_MAX),
                  detail::grid_dim(detail::ceil_div(max_size, kWarps), "row groups of the largest block"),
                  detail::grid_dim(detail::ceil_div(r, kCols), "column groups of v"));
  apply_kernel<T><<<grid, kThreads, 0, stream>>>(inv, layout_dev, v, r, base, scale, out);
  SSSE_CUDA_CHECK_LAUNCH();
}

template void apply_inverse<float>(const float*, const int64_t*, const int64_t*, int64_t,
                                   const float*, int64_t, int64_t, const float*, double, float*,
                                   cudaStream_t);
template void apply_inverse<double>(const double*, const int64_t*, const int64_t*, int64_t,
                                    const double*, int64_t, int64_t, const double*, double,
                                    double*, cudaStream_t);

}  // namespace ssse::cuda
