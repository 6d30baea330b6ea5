// Small dense factorisations done by one thread block in shared memory: the kTile x kTile
// Cholesky factor and its triangular inverse, for the m x m capacitance matrix of a Woodbury
// step and the pivot block of the blocked inverse. Float64 throughout.
#pragma once
#include <cuda_runtime.h>

#include "tile.cuh"

namespace ssse::cuda::detail {

// Leading dimension of the shared kTile x kTile float64 matrices below (odd: column walks
// touch distinct banks).
constexpr int kLdSmall = kTile + 1;

// In place: the leading n x n lower triangle of a (shared, [kTile][kLdSmall]) becomes L with
// L L^T = a. Returns 0, or the 1-based pivot at which a is not positive definite (then a is partly
// overwritten). Every thread of the block must call it and gets the same result.
__device__ inline int cholesky_smem(double* a, int* status, int n = kTile) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (tid == 0) *status = 0;
  __syncthreads();
  for (int j = 0; j < n; ++j) {
    if (tid == 0) {
      const double djj = a[j * kLdSmall + j];
      if (!(djj > 0.0) || !isfinite(djj))
        *status = j + 1;
      else
        a[j * kLdSmall + j] = sqrt(djj);
    }
    __syncthreads();
    const int code = *status;
    if (code != 0) return code;  // uniform: every thread read the same value after the barrier
    const double inv = 1.0 / a[j * kLdSmall + j];
    for (int i = j + 1 + tid; i < n; i += nt) a[i * kLdSmall + j] *= inv;
    __syncthreads();
    const int rem = n - 1 - j;
    for (int e = tid; e < rem * rem; e += nt) {
      const int i = j + 1 + e / rem, c = j + 1 + e % rem;
      if (c <= i) a[i * kLdSmall + c] -= a[i * kLdSmall + j] * a[c * kLdSmall + j];
    }
    __syncthreads();
  }
  return 0;
}

// linv (shared, [kTile][kLdSmall]) = L^{-1} on the leading n x n, lower triangular with zeros
// above the diagonal, from the factor in the lower triangle of l. One thread per column (forward
// substitution).
__device__ inline void lower_inverse_smem(const double* l, double* linv, int n = kTile) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    for (int i = 0; i < j; ++i) linv[i * kLdSmall + j] = 0.0;
    for (int i = j; i < n; ++i) {
      double acc = (i == j) ? 1.0 : 0.0;
      for (int p = j; p < i; ++p) acc -= l[i * kLdSmall + p] * linv[p * kLdSmall + j];
      linv[i * kLdSmall + j] = acc / l[i * kLdSmall + i];
    }
  }
  __syncthreads();
}

}  // namespace ssse::cuda::detail
