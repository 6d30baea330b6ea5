// Compiled with -mavx512f -mfma (see CMakeLists.txt): 8 x 24 doubles = 24 zmm accumulators.
#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
#include "microkernel_impl.inc"
}  // namespace
const MicroKernel kMicroKernelAvx512 = {8, 24, &micro_kernel_impl<8, 24>, "avx512"};
}  // namespace ssse::cpu::detail
