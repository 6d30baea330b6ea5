#include <algorithm>

#include "apply.cuh"
#include "common.cuh"

namespace ssse::cuda {

namespace {
constexpr int kThreads = 256;

// Grid: x = row within the block, y = block, z = right-hand side. Each thread block reduces the
// dot product of one row of F_b^{-1} with v_b in float64 through shared memory.
template <typename T>
__global__ void apply_rows_kernel(const T* __restrict__ inv, const int64_t* __restrict__ layout,
                                  const T* __restrict__ v, int64_t r, const T* base, double scale,
                                  T* out) {
  const int64_t b = blockIdx.y;
  const int64_t c = blockIdx.z;
  const int64_t start = layout[3 * b], size = layout[3 * b + 1], offset = layout[3 * b + 2];
  const int64_t i = blockIdx.x;
  if (i >= size) return;  // blocks smaller than the largest one
  const T* f = inv + offset + i * size;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < size; j += blockDim.x)
    acc += static_cast<double>(f[j]) * static_cast<double>(v[(start + j) * r + c]);
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t row = start + i;
    const double b0 = base != nullptr ? static_cast<double>(base[row * r + c]) : 0.0;
    out[row * r + c] = static_cast<T>(b0 + scale * partial[0]);
  }
}
}  // namespace

template <typename T>
void apply_inverse(const T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                   int64_t num_blocks, const T* v, int64_t d, int64_t r, const T* base,
                   double scale, T* out, cudaStream_t stream) {
  if (d == 0 || r == 0 || num_blocks == 0) return;
  if (num_blocks > 65535 || r > 65535)
    throw std::invalid_argument("ssse_ext: CUDA apply supports at most 65535 blocks and columns");
  int64_t max_size = 0;
  for (int64_t b = 0; b < num_blocks; ++b) max_size = std::max(max_size, layout_host[3 * b + 1]);
  const dim3 grid(static_cast<unsigned>(max_size), static_cast<unsigned>(num_blocks),
                  static_cast<unsigned>(r));
  apply_rows_kernel<T><<<grid, kThreads, 0, stream>>>(inv, layout_dev, v, r, base, scale, out);
  SSSE_CUDA_CHECK_LAUNCH();
}

template void apply_inverse<float>(const float*, const int64_t*, const int64_t*, int64_t,
                                   const float*, int64_t, int64_t, const float*, double, float*,
                                   cudaStream_t);
template void apply_inverse<double>(const double*, const int64_t*, const int64_t*, int64_t,
                                    const double*, int64_t, int64_t, const double*, double,
                                    double*, cudaStream_t);

}  // namespace ssse::cuda
