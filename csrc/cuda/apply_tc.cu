// out = base + scale * blockdiag(F^{-1}) v, bandwidth-bound: every element of F^{-1} is read once
// (once per group of kCols right-hand sides), with 16-byte streaming loads where a block's rows are
// 16-byte aligned and v has one column, and float64 accumulation.
//
// A CTA (8 warps) takes kApplyRows = 16 rows of one block, two rows per warp read together, so that
// a 16 x 1024 layout already has 1024 CTAs in flight. The grid is dense over (block, row group)
// when the blocks are of similar size, and follows a work plan otherwise (no CTA on an empty row
// group, whatever the mix of block sizes).
#include "apply.cuh"
#include "common.cuh"
#include "device.cuh"
#include "plan.cuh"
#include "tile.cuh"

namespace ssse::cuda::tc {

namespace {
using detail::Block;
using detail::load_block;

constexpr int kThreads = 256;
constexpr int kRowsPerWarp = 2;
static_assert(kApplyRows == (kThreads / 32) * kRowsPerWarp, "rows per CTA");
constexpr int kCols = 4;  // right-hand sides per pass over F^{-1}

template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
};
template <>
struct Vec16<double> {
  using type = double2;
};

__device__ __forceinline__ double dot_acc(float4 a, float4 b, double acc) {
  acc = fma(static_cast<double>(a.x), static_cast<double>(b.x), acc);
  acc = fma(static_cast<double>(a.y), static_cast<double>(b.y), acc);
  acc = fma(static_cast<double>(a.z), static_cast<double>(b.z), acc);
  return fma(static_cast<double>(a.w), static_cast<double>(b.w), acc);
}
__device__ __forceinline__ double dot_acc(double2 a, double2 b, double acc) {
  acc = fma(a.x, b.x, acc);
  return fma(a.y, b.y, acc);
}

// (4 CTAs of 8 warps per SM: at most 64 registers.)
template <typename T, bool kPlanned>
__global__ void __launch_bounds__(kThreads, 4)
    apply_tc_kernel(const T* __restrict__ inv,            // packed [sum size_b^2]
                    const int64_t* __restrict__ layout,   // [num_blocks, 3]
                    const int64_t* __restrict__ order,    // [ranked] (kPlanned)
                    const __grid_constant__ ClassTable table,
                    const T* __restrict__ v,              // [d, r]
                    int64_t r,
                    const T* base,                        // [d, r] or nullptr; may alias out
                    double scale,
                    T* out) {                             // [d, r]
  int64_t b, group;
  unsigned cgroup;
  if constexpr (kPlanned) {
    const WorkItem w = find_work(table, order, blockIdx.x);
    b = w.block;
    group = w.index;
    cgroup = blockIdx.y;
  } else {
    b = blockIdx.x;
    group = blockIdx.y;
    cgroup = blockIdx.z;
  }
  const Block blk = load_block(layout, b);
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row0 = group * kApplyRows + warp * kRowsPerWarp;
  if (row0 >= blk.size) return;  // whole warps; this kernel has no block barrier
  const bool two = row0 + 1 < blk.size;
  const int64_t c0 = static_cast<int64_t>(cgroup) * kCols;
  const int nc = r - c0 < kCols ? static_cast<int>(r - c0) : kCols;
  const T* f0 = inv + blk.offset + row0 * blk.size;
  const T* f1 = two ? f0 + blk.size : f0;
  double acc0[kCols], acc1[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc0[c] = acc1[c] = 0.0;

  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec = r == 1 && blk.size % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(f0) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(v + blk.start) % 16 == 0;
  if (vec) {
    using V = typename Vec16<T>::type;
    const V* a0 = reinterpret_cast<const V*>(f0);
    const V* a1 = reinterpret_cast<const V*>(f1);
    const V* x = reinterpret_cast<const V*>(v + blk.start);
    const int64_t n = blk.size / kVec;
#pragma unroll 4
    for (int64_t w = lane; w < n; w += 32) {
      const V xv = dev::load_ro(x + w);
      const V p = dev::load_stream(a0 + w);
      const V q = dev::load_stream(a1 + w);
      acc0[0] = dot_acc(p, xv, acc0[0]);
      acc1[0] = dot_acc(q, xv, acc1[0]);
    }
  } else {
    const T* vb = v + blk.start * r + c0;
#pragma unroll 4
    for (int64_t j = lane; j < blk.size; j += 32) {
      const double p = static_cast<double>(dev::load_stream(f0 + j));
      const double q = static_cast<double>(dev::load_stream(f1 + j));
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (c < nc) {
          const double xv = static_cast<double>(dev::load_ro(vb + j * r + c));
          acc0[c] = fma(p, xv, acc0[c]);
          acc1[c] = fma(q, xv, acc1[c]);
        }
    }
  }
  double sum0 = 0.0, sum1 = 0.0;
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (c < nc) {
      const double s0 = dev::warp_sum(acc0[c]), s1 = dev::warp_sum(acc1[c]);
      if (lane == c) {
        sum0 = s0;
        sum1 = s1;
      }
    }
  if (lane < nc) {
    const int64_t idx = (blk.start + row0) * r + c0 + lane;
    const double b0 = base != nullptr ? static_cast<double>(base[idx]) : 0.0;
    out[idx] = static_cast<T>(b0 + scale * sum0);
    if (two) {
      const double b1 = base != nullptr ? static_cast<double>(base[idx + r]) : 0.0;
      out[idx + r] = static_cast<T>(b1 + scale * sum1);
    }
  }
}

// A dense (block, row group) grid is used when it has at most twice the CTAs a plan would.
bool dense_grid(const int64_t* layout_host, int64_t num_blocks, int64_t& max_groups) {
  int64_t groups = 0;
  max_groups = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t g = tiles_of(layout_host[3 * b + 1], kApplyRows);
    groups += g;
    max_groups = g > max_groups ? g : max_groups;
  }
  return max_groups <= 65535 && num_blocks <= 2147483647 && max_groups * num_blocks <= 2 * groups;
}

}  // namespace

size_t apply_inverse_workspace_bytes(const int64_t* layout_host, int64_t num_blocks) {
  if (num_blocks <= 0) return 0;
  int64_t max_groups;
  if (dense_grid(layout_host, num_blocks, max_groups)) return 0;
  return Plan(layout_host, num_blocks, Keying::kApply).workspace_bytes();
}

template <typename T>
void apply_inverse(const T* inv, const int64_t* layout_host, const int64_t* layout_dev,
                   int64_t num_blocks, const T* v, int64_t d, int64_t r, const T* base,
                   double scale, T* out, void* work, size_t work_bytes, cudaStream_t stream) {
  (void)d;
  if (r <= 0 || num_blocks <= 0) return;
  int64_t max_groups;
  const bool dense = dense_grid(layout_host, num_blocks, max_groups);
  if (max_groups == 0) return;
  DeviceGuard guard(out);
  const unsigned cgroups = detail::grid_dim(detail::ceil_div(r, kCols), "column groups of v");
  if (dense) {
    dev::launch(apply_tc_kernel<T, false>,
                dim3(static_cast<unsigned>(num_blocks), static_cast<unsigned>(max_groups), cgroups),
                dim3(kThreads), 0, stream, inv, layout_dev, static_cast<const int64_t*>(nullptr),
                ClassTable{}, v, r, base, scale, out);
    return;
  }
  const Plan plan(layout_host, num_blocks, Keying::kApply);
  const int64_t* order = plan.build(layout_dev, num_blocks, work, work_bytes, stream);
  auto groups = [](int key) -> int64_t { return key; };
  for (const auto& [table, n] : plan.tables(groups, [](int) { return true; }))
    dev::launch(apply_tc_kernel<T, true>, dim3(static_cast<unsigned>(n), cgroups), dim3(kThreads),
                0, stream, inv, layout_dev, order, table, v, r, base, scale, out);
}

template void apply_inverse<float>(const float*, const int64_t*, const int64_t*, int64_t,
                                   const float*, int64_t, int64_t, const float*, double, float*,
                                   void*, size_t, cudaStream_t);
template void apply_inverse<double>(const double*, const int64_t*, const int64_t*, int64_t,
                                    const double*, int64_t, int64_t, const double*, double,
                                    double*, void*, size_t, cudaStream_t);

}  // namespace ssse::cuda::tc
