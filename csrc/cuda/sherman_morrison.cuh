// CUDA twin of csrc/cpu/sherman_morrison.h: Sherman-Morrison updates and downdates of a block
// inverse Fisher (paper eq. 7). sign = +1 adds the gradients (F <- F + g g^T / N), sign = -1
// removes them. Both entry points run on `stream` without host synchronisation; info is reset
// to 0 on the stream first.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssse::cuda {

// Bytes of the device workspace for sherman_morrison_rank1 (chunked = false) or
// sherman_morrison_chunk (chunked = true) on this layout, elements of element_size bytes.
size_t sherman_morrison_workspace_bytes(size_t element_size, bool chunked,
                                        const int64_t* layout_host, int64_t num_blocks);

// The literal per-sample recurrence in T arithmetic, rows in order:
//   v = F^{-1} g;  den = N + sign g^T v;  F^{-1} <- F^{-1} - sign v v^T / den.
// info[b] = 0, or the 1-based row whose denominator was not positive (block b stops there).
template <typename T>
void sherman_morrison_rank1(T* inv,                      // device, packed [sum size_b^2]
                            const int64_t* layout_host,  // host [num_blocks, 3]
                            const int64_t* layout_dev,   // device [num_blocks, 3]
                            int64_t num_blocks,
                            const T* grads,              // device [m, d] row-major
                            int64_t m, int64_t d, double normalizer, int sign,
                            int64_t* info,               // device [num_blocks]
                            void* work, size_t work_bytes, cudaStream_t stream);

// The chunked (Woodbury) form, in sub-chunks G_t of up to 64 rows:
//   C_t = N I + sign G_t^T U_t = L L^T (float64),  W_t = U_t L^{-T},
//   F^{-1} <- F^{-1} - sign W_t W_t^T,  U_{t+1} = F^{-1} G_{t+1},
// where one fused pass over each F^{-1} block applies sub-chunk t and accumulates U_{t+1}; the
// m x m work of each sub-chunk runs in its own small kernels. info[b] = 0, or the 1-based row
// (sub-chunk offset + pivot) at which C_t stopped being positive definite; block b then keeps
// the sub-chunks before that one (callers that need atomicity work on a copy, as ssse_ext does).
template <typename T>
void sherman_morrison_chunk(T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                            int64_t num_blocks, const T* grads, int64_t m, int64_t d,
                            double normalizer, int sign, int64_t* info, void* work,
                            size_t work_bytes, cudaStream_t stream);

// ---- tensor-core kernels (SSSE_CUDA_KERNELS=tc) -------------------------------------------------
namespace tc {

// Bytes of the device workspace of tc::sherman_morrison_chunk for this layout (bounded: blocks are
// processed in groups whose workspace fits in 512 MiB, or one block at a time).
size_t sherman_morrison_chunk_workspace_bytes(const int64_t* layout_host, int64_t num_blocks);

// As ssse::cuda::sherman_morrison_chunk (same info convention), with float64 arithmetic on DMMA
// for both storage types: the blocks are rounded to T once per rank-64 sub-chunk.
template <typename T>
void sherman_morrison_chunk(T* inv,                      // device, packed [sum size_b^2]
                            const int64_t* layout_host,  // host [num_blocks, 3]
                            const int64_t* layout_dev,   // device [num_blocks, 3]
                            int64_t num_blocks,
                            const T* grads,              // device [m, d] row-major
                            int64_t m, int64_t d, double normalizer, int sign,
                            int64_t* info,               // device [num_blocks]
                            void* work, size_t work_bytes, cudaStream_t stream);

}  // namespace tc

}  // namespace ssse::cuda
