// Baseline instruction set of the build (no -m flags): register tiles of 4 x 4 doubles, slabs 256
// deep, packed B blocks of 240 columns.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
constexpr int kVectorDoubles = 2;
#include "microkernel_impl.inc"
#include "dense_impl.inc"
}  // namespace
SSSE_DEFINE_MICRO_KERNEL(kMicroKernelGeneric, "generic", 4, 4, 256, 96, 240, 256)
}  // namespace ssse::cpu::detail
