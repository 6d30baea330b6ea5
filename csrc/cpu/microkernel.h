// Register-blocked micro-kernel of the CPU GEMM, compiled once per instruction set and chosen at
// run time, so that default builds need no -march flag and still use AVX2/AVX-512 where present.
#pragma once
#include <cstdint>

namespace ssse::cpu::detail {

// acc[MR x NR] (row-major) = sum over k of ap[k, 0:MR] (outer) bp[k, 0:NR].
// ap: [kc, MR] packed panel of A, bp: [kc, NR] packed panel of B.
using MicroKernelFn = void (*)(int64_t kc, const double* ap, const double* bp, double* acc);

struct MicroKernel {
  int mr;
  int nr;
  MicroKernelFn fn;
  const char* isa;
};

// The best kernel for the running CPU (decided once).
const MicroKernel& micro_kernel();

extern const MicroKernel kMicroKernelGeneric;
#if defined(__x86_64__) || defined(_M_X64)
extern const MicroKernel kMicroKernelAvx2;
extern const MicroKernel kMicroKernelAvx512;
#endif

}  // namespace ssse::cpu::detail
