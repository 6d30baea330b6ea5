// Compiled with -mavx2 -mfma (see CMakeLists.txt): 4 x 12 doubles = 12 ymm accumulators.
#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
#include "microkernel_impl.inc"
}  // namespace
const MicroKernel kMicroKernelAvx2 = {4, 12, &micro_kernel_impl<4, 12>, "avx2"};
}  // namespace ssse::cpu::detail
