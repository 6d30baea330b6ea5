// Block inverse Fisher times one or many vectors, fused with the SSSE step (paper eq. 8):
//   out = base + scale * blockdiag(F^{-1}) v.
#pragma once
#include <cstdint>

namespace ssse::cpu {

template <typename T>
void apply_inverse(const T* inv,           // packed [sum size_b^2], full symmetric blocks
                   const int64_t* layout,  // [num_blocks, 3] (start, size, offset)
                   int64_t num_blocks,
                   const T* v,             // [d, r] row-major
                   int64_t d, int64_t r,
                   const T* base,          // [d, r] row-major, or nullptr for zero
                   double scale,
                   T* out,                 // [d, r] row-major; may alias base, not v
                   int threads);

}  // namespace ssse::cpu
