#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
#include "microkernel_impl.inc"
}  // namespace
const MicroKernel kMicroKernelGeneric = {4, 4, &micro_kernel_impl<4, 4>, "generic"};
}  // namespace ssse::cpu::detail
