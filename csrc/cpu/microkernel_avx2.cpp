// Compiled with -mavx2 -mfma (see CMakeLists.txt): register tiles of 4 x 12 doubles (12 ymm
// accumulators), slabs 256 deep, packed B blocks of 240 columns (480 KiB, for L2s from 512 KiB).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>

#include <immintrin.h>

#define SSSE_KERNEL_ISA_AVX2 1  // the intrinsics of microkernel_impl.inc for this target

#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
constexpr int kVectorDoubles = 4;
#include "microkernel_impl.inc"
#include "dense_impl.inc"
}  // namespace
SSSE_DEFINE_MICRO_KERNEL(kMicroKernelAvx2, "avx2", 4, 12, 256, 96, 240, 256)
}  // namespace ssse::cpu::detail
