// Sherman–Morrison updates and downdates of a block inverse Fisher (paper eq. 7).
// sign = +1 adds the gradients (F <- F + g g^T / N), sign = -1 removes them (F <- F - g g^T / N).
#pragma once
#include <cstdint>

namespace ssse::cpu {

// The literal per-sample recurrence, in T arithmetic: for each row g of grads in order,
//   v = F^{-1} g;  den = N + sign g^T v;  F^{-1} <- F^{-1} - sign v v^T / den.
// info[b] = 0, or the 1-based row whose denominator was not positive (block b then stops there).
template <typename T>
void sherman_morrison_rank1(T* inv,                 // packed [sum size_b^2], full symmetric blocks
                            const int64_t* layout,  // [num_blocks, 3] (start, size, offset)
                            int64_t num_blocks,
                            const T* grads,         // [m, d] row-major
                            int64_t m, int64_t d, double normalizer, int sign,
                            int64_t* info,          // [num_blocks]
                            int threads);

// The chunked (Woodbury) form, in float64 arithmetic, in rank-64 steps over the m rows:
//   U = F^{-1} G, C = N I_m + sign G^T U = L L^T, W = U L^{-T}, F^{-1} <- F^{-1} - sign W W^T.
// info[b] = 0, or the 1-based row of the call at whose step C stopped being positive definite
// (a float32 block is then left unchanged, a float64 block keeps the earlier steps; callers
// work on a copy).
template <typename T>
void sherman_morrison_chunk(T* inv, const int64_t* layout, int64_t num_blocks, const T* grads,
                            int64_t m, int64_t d, double normalizer, int sign, int64_t* info,
                            int threads);

}  // namespace ssse::cpu
