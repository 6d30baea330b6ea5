// Compiled with -mavx512f -mfma (see CMakeLists.txt): register tiles of 8 x 24 doubles (24 zmm
// accumulators), slabs 256 deep, packed B blocks of 480 columns (960 KiB, for L2s of 1-2 MiB).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>

#include <immintrin.h>

#define SSSE_KERNEL_ISA_AVX512 1  // the intrinsics of microkernel_impl.inc for this target

#include "microkernel.h"

namespace ssse::cpu::detail {
namespace {
constexpr int kVectorDoubles = 8;
#include "microkernel_impl.inc"
#include "dense_impl.inc"
}  // namespace
SSSE_DEFINE_MICRO_KERNEL(kMicroKernelAvx512, "avx512", 8, 24, 256, 96, 480, 256)
}  // namespace ssse::cpu::detail
