#include "microkernel.h"

#include <cstdlib>
#include <cstring>

namespace ssse::cpu::detail {

namespace {
const MicroKernel& choose() {
  // SSSE_CPU_ISA=generic|avx2|avx512 forces a kernel set (for tests and benchmarks).
  const char* forced = std::getenv("SSSE_CPU_ISA");
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (forced != nullptr) {
    if (std::strcmp(forced, "avx512") == 0 && has512) return kMicroKernelAvx512;
    if (std::strcmp(forced, "avx2") == 0 && has2) return kMicroKernelAvx2;
    if (std::strcmp(forced, "generic") == 0) return kMicroKernelGeneric;
  }
  if (has512) return kMicroKernelAvx512;
  if (has2) return kMicroKernelAvx2;
#else
  (void)forced;
#endif
  return kMicroKernelGeneric;
}
}  // namespace

const MicroKernel& micro_kernel() {
  static const MicroKernel& chosen = choose();
  return chosen;
}

}  // namespace ssse::cpu::detail
