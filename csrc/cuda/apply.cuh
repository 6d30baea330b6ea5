// CUDA twin of csrc/cpu/apply.h: out = base + scale * blockdiag(F^{-1}) v.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ssse::cuda {

template <typename T>
void apply_inverse(const T* inv,                // device, packed [sum size_b^2]
                   const int64_t* layout_host,  // host [num_blocks, 3] (start, size, offset)
                   const int64_t* layout_dev,   // the same table on the device
                   int64_t num_blocks,
                   const T* v,                  // device [d, r] row-major
                   int64_t d, int64_t r,
                   const T* base,               // device [d, r] or nullptr
                   double scale,
                   T* out,                      // device [d, r]; may alias base, not v
                   cudaStream_t stream);

// ---- tensor-core set (SSSE_CUDA_KERNELS=tc): a bandwidth-bound apply ------------------------------
namespace tc {

// Bytes of the device workspace of tc::apply_inverse for this layout: 0 when a dense grid over
// (block, row group) wastes little, else a work plan (no CTA on an empty row group).
size_t apply_inverse_workspace_bytes(const int64_t* layout_host, int64_t num_blocks);

template <typename T>
void apply_inverse(const T* inv,                // device, packed [sum size_b^2]
                   const int64_t* layout_host,  // host [num_blocks, 3] (start, size, offset)
                   const int64_t* layout_dev,   // the same table on the device
                   int64_t num_blocks,
                   const T* v,                  // device [d, r] row-major
                   int64_t d, int64_t r,
                   const T* base,               // device [d, r] or nullptr
                   double scale,
                   T* out,                      // device [d, r]; may alias base, not v
                   void* work, size_t work_bytes,  // device workspace
                   cudaStream_t stream);

}  // namespace tc

}  // namespace ssse::cuda
