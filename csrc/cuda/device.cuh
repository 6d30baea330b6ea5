// Device primitives of the tensor-core ("tc") kernels: float64 tensor-core MMA (DMMA), cp.async,
// warp collectives, dynamic shared memory and the launch helper. Every inline-PTX instruction of
// the tc kernels lives here, so that the same kernel sources also compile as host C++ under the
// emulator of tests/cuda_emu (SSSE_CUDA_EMULATE), which runs each thread block as cooperative
// threads and checks barriers, warp convergence, cp.async ordering and shared-memory bounds.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

#ifdef SSSE_CUDA_EMULATE
#include "emu.h"  // tests/cuda_emu: the emulated device
#endif

namespace ssse::cuda::dev {

// ---- float64 tensor-core MMA ------------------------------------------------------------------
// d += A B for A 16x4 (row-major), B 4x8 (column-major), d 16x8, all float64, one warp. Fragments
// (PTX ISA, "Matrix Fragments for mma.m16n8k4", .f64), g = lane / 4, t = lane % 4:
//   a0 = A[g][t], a1 = A[g + 8][t];  b0 = B[t][g];
//   d[0], d[1] = D[g][2t], D[g][2t + 1];  d[2], d[3] = D[g + 8][2t], D[g + 8][2t + 1].
// kNative selects mma.m16n8k4 (sm_90) over two mma.m8n8k4 (sm_80+: the m8n8k4 fragments are the
// upper and lower halves of the m16n8k4 ones). Every lane of the warp must call it.
template <bool kNative>
__device__ __forceinline__ void dmma_16x8x4(double (&d)[4], double a0, double a1, double b0) {
#if defined(SSSE_CUDA_EMULATE)
  (void)kNative;
  ::emu::dmma_16x8x4(d, a0, a1, b0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kNative) {
    asm volatile(
        "mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};\n"
        : "+d"(d[0]), "+d"(d[1]), "+d"(d[2]), "+d"(d[3])
        : "d"(a0), "d"(a1), "d"(b0));
  } else {
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                 : "+d"(d[0]), "+d"(d[1])
                 : "d"(a0), "d"(b0));
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                 : "+d"(d[2]), "+d"(d[3])
                 : "d"(a1), "d"(b0));
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  (void)kNative;
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a0), "d"(b0));
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d[2]), "+d"(d[3])
               : "d"(a1), "d"(b0));
#elif defined(__CUDA_ARCH__)
  // No float64 tensor cores before sm_80: the same fragments through shuffles and DFMA.
  (void)kNative;
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const double ar0 = __shfl_sync(0xffffffffu, a0, g * 4 + k);
    const double ar1 = __shfl_sync(0xffffffffu, a1, g * 4 + k);
    const double bc0 = __shfl_sync(0xffffffffu, b0, (2 * t) * 4 + k);
    const double bc1 = __shfl_sync(0xffffffffu, b0, (2 * t + 1) * 4 + k);
    d[0] = fma(ar0, bc0, d[0]);
    d[1] = fma(ar0, bc1, d[1]);
    d[2] = fma(ar1, bc0, d[2]);
    d[3] = fma(ar1, bc1, d[3]);
  }
#else
  (void)kNative; (void)d; (void)a0; (void)a1; (void)b0;
#endif
}

// ---- cp.async (global -> shared without registers) ----------------------------------------------
// Copies `bytes` (16 or 8) to shared memory, of which the first `src_bytes` come from global memory
// and the rest is zero-filled (src_bytes = 0: no global read; src must still be a valid address).
// Visible to the issuing thread after cp_async_wait<N>() retires its group; to the block after a
// barrier that follows that wait.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(SSSE_CUDA_EMULATE)
  ::emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  const unsigned char* s = static_cast<const unsigned char*>(gmem_src);
  unsigned char* t = static_cast<unsigned char*>(smem_dst);
  for (int i = 0; i < 16; ++i) t[i] = i < src_bytes ? s[i] : 0;
#else
  (void)smem_dst; (void)gmem_src; (void)src_bytes;
#endif
}

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(SSSE_CUDA_EMULATE)
  ::emu::cp_async(smem_dst, gmem_src, 8, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  const unsigned char* s = static_cast<const unsigned char*>(gmem_src);
  unsigned char* t = static_cast<unsigned char*>(smem_dst);
  for (int i = 0; i < 8; ++i) t[i] = i < src_bytes ? s[i] : 0;
#else
  (void)smem_dst; (void)gmem_src; (void)src_bytes;
#endif
}

// Closes the current group of cp.async copies of this thread.
__device__ __forceinline__ void cp_async_commit() {
#if defined(SSSE_CUDA_EMULATE)
  ::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SSSE_CUDA_EMULATE)
  ::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- loads --------------------------------------------------------------------------------------
// Read-only loads through the non-coherent cache (data that no thread of the launch writes).
template <typename V>
__device__ __forceinline__ V load_ro(const V* p) {
#if defined(SSSE_CUDA_EMULATE)
  return *p;
#else
  return __ldg(p);
#endif
}

// Streaming loads of data read exactly once (keeps it from evicting reused lines).
template <typename V>
__device__ __forceinline__ V load_stream(const V* p) {
#if defined(SSSE_CUDA_EMULATE)
  return *p;
#else
  return __ldcs(p);
#endif
}

// ---- shared memory and warp collectives -------------------------------------------------------
// The dynamic shared memory of the block, 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(SSSE_CUDA_EMULATE)
  return reinterpret_cast<T*>(::emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char ssse_dynamic_smem[];
  return reinterpret_cast<T*>(ssse_dynamic_smem);
#endif
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ unsigned warp_ballot(bool p) {
  return __ballot_sync(0xffffffffu, p);
}

// ---- warp tiles -------------------------------------------------------------------------------
// acc[i][j] (16 x 8 tiles) += A(m0 + 16 i + .., k) B(k, n0 + 8 j + ..) for k < kdim (a multiple of 4),
// one warp, operands in shared memory with element (m, k) of A at a[k * a_k + m * a_m] and (k, n)
// of B at b[k * b_k + n * b_n]. With one of the two strides 1 and the other = 4 (mod 16) doubles,
// the fragment loads of a warp touch every bank pair exactly twice (no conflicts).
template <bool kNative, int MT, int NT>
__device__ __forceinline__ void warp_mma(double (&acc)[MT][NT][4], const double* __restrict__ a,
                                         int a_k, int a_m, const double* __restrict__ b, int b_k,
                                         int b_n, int m0, int n0, int kdim) {
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  const double* ap = a + t * a_k + (m0 + g) * a_m;
  const double* bp = b + t * b_k + (n0 + g) * b_n;
#pragma unroll 2
  for (int k = 0; k < kdim; k += 4) {
    double fa[MT][2], fb[NT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      fa[i][0] = ap[(16 * i) * a_m];
      fa[i][1] = ap[(16 * i + 8) * a_m];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) fb[j] = bp[(8 * j) * b_n];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) dmma_16x8x4<kNative>(acc[i][j], fa[i][0], fa[i][1], fb[j]);
    ap += 4 * a_k;
    bp += 4 * b_k;
  }
}

// Row and column, within the warp tile, of accumulator element e of tile (i, j).
__device__ __forceinline__ int acc_row(int i, int e) {
  return 16 * i + ((static_cast<int>(threadIdx.x) & 31) >> 2) + 8 * (e >> 1);
}
__device__ __forceinline__ int acc_col(int j, int e) {
  return 8 * j + 2 * (static_cast<int>(threadIdx.x) & 3) + (e & 1);
}

// ---- host side ----------------------------------------------------------------------------------
// Launches kernel<<<grid, block, smem, stream>>>(args...) and checks the launch; raises the dynamic
// shared-memory limit first where smem exceeds the 48 KiB default.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            Args&&... args) {
  if (smem > 48 * 1024) {
    int device = 0, optin = 0;
    SSSE_CUDA_CHECK(cudaGetDevice(&device));
    SSSE_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (smem > static_cast<size_t>(optin))
      throw std::runtime_error(
          "ssse_ext CUDA: a tc kernel needs " + std::to_string(smem) +
          " bytes of shared memory per block, this device allows " + std::to_string(optin) +
          " (the tc kernels are tuned for sm_90); use SSSE_CUDA_KERNELS=simt");
    SSSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  }
#if defined(SSSE_CUDA_EMULATE)
  ::emu::launch(grid, block, smem, [&]() { kernel(static_cast<Params>(args)...); });
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
#endif
  SSSE_CUDA_CHECK_LAUNCH();
}

}  // namespace ssse::cuda::dev
