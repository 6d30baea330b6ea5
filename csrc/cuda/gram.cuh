// CUDA twin of csrc/cpu/gram.h: the stable build of the block inverse Fisher. Gradient chunks
// stream into per-block float64 Gram matrices; then F_b = damping I + gram_b / normalizer is
// inverted by a blocked symmetric Gauss-Jordan sweep (pivot blocks of kTile, lower storage).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssse::cuda {

// gram_b += X_b^T X_b (lower triangle, float64 accumulation), X_b = grads[:, start_b:+size_b].
// float32 products are exact in float64, so the Gram matrix carries only float64 summation error
// and the float32 build meets its 1e-4 contract up to condition numbers far beyond 1e3.
template <typename T>
void gram_accumulate(const T* grads,              // device [m, d] row-major
                     int64_t m, int64_t d,
                     const int64_t* layout_host,  // host [num_blocks, 3] (start, size, offset)
                     const int64_t* layout_dev,   // the same table on the device
                     int64_t num_blocks,
                     double* gram,                // device, packed [sum size_b^2]
                     cudaStream_t stream);

// Bytes of the device workspace inverse_from_gram needs for this layout.
size_t inverse_from_gram_workspace_bytes(const int64_t* layout_host, int64_t num_blocks);

// out_b = (damping I + gram_b / normalizer)^{-1} in T, full symmetric. gram (lower triangle
// read) is overwritten as workspace. info[b] = 0, or the 1-based pivot at which F_b is not
// positive definite (the potrf code); out_b is then left untouched.
template <typename T>
void inverse_from_gram(double* gram,                // device, packed [sum size_b^2]
                       const int64_t* layout_host,  // host [num_blocks, 3]
                       const int64_t* layout_dev,   // device [num_blocks, 3]
                       int64_t num_blocks, double damping, double normalizer,
                       T* out,                      // device, packed [sum size_b^2]
                       int64_t* info,               // device [num_blocks]
                       void* work, size_t work_bytes,  // device workspace
                       cudaStream_t stream);

// ---- tensor-core kernels (SSSE_CUDA_KERNELS=tc): same contracts, float64 tensor cores ----------
namespace tc {

// Bytes of the device workspace (the work plan) of tc::gram_accumulate for this layout.
size_t gram_accumulate_workspace_bytes(const int64_t* layout_host, int64_t num_blocks);

// As ssse::cuda::gram_accumulate, on DMMA. native_dmma: mma.m16n8k4 on sm_90 (else two m8n8k4).
template <typename T>
void gram_accumulate(const T* grads,              // device [m, d] row-major
                     int64_t m, int64_t d,
                     const int64_t* layout_host,  // host [num_blocks, 3] (start, size, offset)
                     const int64_t* layout_dev,   // the same table on the device
                     int64_t num_blocks,
                     double* gram,                // device, packed [sum size_b^2]
                     void* work, size_t work_bytes,  // device workspace
                     bool native_dmma, cudaStream_t stream);

// Bytes of the device workspace of tc::inverse_from_gram for this layout.
size_t inverse_from_gram_workspace_bytes(const int64_t* layout_host, int64_t num_blocks);

// As ssse::cuda::inverse_from_gram (same info convention), with the trailing updates on DMMA and
// no workspace that grows with d (panels live in the unused upper triangle of each gram block).
template <typename T>
void inverse_from_gram(double* gram,                // device, packed [sum size_b^2]
                       const int64_t* layout_host,  // host [num_blocks, 3]
                       const int64_t* layout_dev,   // device [num_blocks, 3]
                       int64_t num_blocks, double damping, double normalizer,
                       T* out,                      // device, packed [sum size_b^2]
                       int64_t* info,               // device [num_blocks]
                       void* work, size_t work_bytes,  // device workspace
                       cudaStream_t stream);

}  // namespace tc

}  // namespace ssse::cuda
