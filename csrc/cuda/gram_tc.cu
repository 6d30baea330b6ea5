// Gram accumulation on float64 tensor cores: gram_b += X_b^T X_b over the lower 128 x 128 tiles of
// every block, float64 accumulators, float32 or float64 inputs converted slice by slice on their way
// into shared memory (never a float64 copy of a gradient chunk).
//
// One CTA (8 warps, 2 x 4 warp tiles of 64 x 32) per work item of the plan: a lower tile (ti, tj)
// of one block, or one group of adjacent small blocks whose union of columns (< 128) is
// accumulated as one diagonal tile and scattered into the members' diagonal sub-blocks. The rows of
// X stream through shared memory in slices of 16: float64 inputs by cp.async, three stages deep;
// float32 inputs through registers (load slice k+1, compute slice k, convert and store slice k+1),
// two stages. A diagonal tile reads one operand only.
#include "common.cuh"
#include "device.cuh"
#include "gram.cuh"
#include "plan.cuh"
#include "tile.cuh"

namespace ssse::cuda::tc {

namespace {
using detail::Block;
using detail::load_block;
using detail::lower_tile;

constexpr int kGK = 16;                  // rows of X per stage
constexpr int kGLd = kGramTile + 4;      // smem row pitch in doubles: = 4 (mod 16), so that the
                                         // fragment loads of a warp hit every bank pair twice
constexpr int kGThreads = 256;           // 8 warps
constexpr int kSlice = kGK * kGLd;       // doubles of one operand slice

template <typename T>
constexpr int gram_stages() {
  return sizeof(T) == 8 ? 3 : 2;
}

struct GroupMember {
  int64_t offset;  // of the member's matrix in the packed storage
  int lo;          // first column of the member inside the group
  int size;
};

struct GroupSmem {
  GroupMember members[kGroupMax];
  unsigned char map[kGramTile];  // column of the group -> member
  unsigned ballot[2];
};

template <typename T>
constexpr size_t gram_smem_bytes() {
  return sizeof(double) * gram_stages<T>() * 2 * kSlice + sizeof(GroupSmem);
}

__device__ __forceinline__ int leading_ones(unsigned x) {
  return ~x == 0u ? 32 : __ffs(~x) - 1;
}

// ---- float64 operands: cp.async straight into the stage ----
__device__ __forceinline__ void issue_slice(double* __restrict__ dst, const double* __restrict__ x,
                                            int64_t m, int64_t d, int64_t col, int ext, int64_t k0,
                                            bool vec) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {  // 16-byte copies: 16 rows x 64 pairs
#pragma unroll
    for (int u = 0; u < (kGK * kGramTile / 2) / kGThreads; ++u) {
      const int q = tid + u * kGThreads;
      const int row = q >> 6, c = (q & 63) * 2;
      const int64_t k = k0 + row;
      const double* src = x;
      int bytes = 0;
      if (k < m && c < ext) {
        src = x + k * d + col + c;
        bytes = (ext - c >= 2 ? 2 : 1) * static_cast<int>(sizeof(double));
      }
      dev::cp_async_16(dst + row * kGLd + c, src, bytes);
    }
  } else {  // 8-byte copies: any alignment of d and of the block start
#pragma unroll
    for (int u = 0; u < (kGK * kGramTile) / kGThreads; ++u) {
      const int e = tid + u * kGThreads;
      const int row = e >> 7, c = e & (kGramTile - 1);
      const int64_t k = k0 + row;
      const bool ok = k < m && c < ext;
      dev::cp_async_8(dst + row * kGLd + c, ok ? x + k * d + col + c : x,
                      ok ? static_cast<int>(sizeof(double)) : 0);
    }
  }
}

// ---- float32 operands: registers, converted when stored ----
struct Staged {
  float v[8];
};

__device__ __forceinline__ void fetch_slice(Staged& r, const float* __restrict__ x, int64_t m,
                                            int64_t d, int64_t col, int ext, int64_t k0,
                                            bool vec) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {  // float4: 16 rows x 32 quads
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = tid + u * kGThreads;
      const int row = q >> 5, c = (q & 31) * 4;
      const int64_t k = k0 + row;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (k < m && c < ext) {
        // In bounds: c < ext, and col + c and d are multiples of 4, so the quad ends in the row.
        f = dev::load_ro(reinterpret_cast<const float4*>(x + k * d + col + c));
        if (c + 1 >= ext) f.y = 0.f;
        if (c + 2 >= ext) f.z = 0.f;
        if (c + 3 >= ext) f.w = 0.f;
      }
      r.v[4 * u] = f.x;
      r.v[4 * u + 1] = f.y;
      r.v[4 * u + 2] = f.z;
      r.v[4 * u + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int e = tid + u * kGThreads;
      const int row = e >> 7, c = e & (kGramTile - 1);
      const int64_t k = k0 + row;
      r.v[u] = (k < m && c < ext) ? dev::load_ro(x + k * d + col + c) : 0.f;
    }
  }
}

__device__ __forceinline__ void store_slice(double* __restrict__ dst, const Staged& r, bool vec) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = tid + u * kGThreads;
      const int row = q >> 5, c = (q & 31) * 4;
      double2* p = reinterpret_cast<double2*>(dst + row * kGLd + c);
      p[0] = make_double2(r.v[4 * u], r.v[4 * u + 1]);
      p[1] = make_double2(r.v[4 * u + 2], r.v[4 * u + 3]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int e = tid + u * kGThreads;
      dst[(e >> 7) * kGLd + (e & (kGramTile - 1))] = r.v[u];
    }
  }
}

// acc += A^T B over one stage: As, Bs [kGK][kGLd], element (k, column).
template <bool kNative>
__device__ __forceinline__ void mma_stage(double (&acc)[4][4][4], const double* __restrict__ as,
                                          const double* __restrict__ bs, int wm0, int wn0, int g,
                                          int t) {
#pragma unroll
  for (int kk = 0; kk < kGK; kk += 4) {
    const double* ap = as + (kk + t) * kGLd + wm0 + g;
    const double* bp = bs + (kk + t) * kGLd + wn0 + g;
    double a[4][2], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[i][0] = ap[16 * i];
      a[i][1] = ap[16 * i + 8];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = bp[8 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dev::dmma_16x8x4<kNative>(acc[i][j], a[i][0], a[i][1], b[j]);
  }
}

template <typename T, bool kNative>
__global__ void __launch_bounds__(kGThreads, 1)
    gram_tc_kernel(const T* __restrict__ x,              // [m, d]
                   int64_t m, int64_t d,
                   const int64_t* __restrict__ layout,   // [num_blocks, 3]
                   int64_t num_blocks,
                   const int64_t* __restrict__ order,    // [ranked]
                   const __grid_constant__ ClassTable table,
                   double* __restrict__ gram) {          // packed [sum size_b^2]
  constexpr int kStages = gram_stages<T>();
  double* smem = dev::dynamic_smem<double>();
  GroupSmem& grp = *reinterpret_cast<GroupSmem*>(smem + kStages * 2 * kSlice);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;

  const WorkItem w = find_work(table, order, blockIdx.x);
  const Block blk = load_block(layout, w.block);
  int ti = 0, tj = 0, ext_a, ext_b;
  int64_t col_a, col_b;
  if (w.tiles > 0) {
    lower_tile(w.index, ti, tj);
    col_a = blk.start + static_cast<int64_t>(ti) * kGramTile;
    col_b = blk.start + static_cast<int64_t>(tj) * kGramTile;
    ext_a = detail::clamp_extent(blk.size - static_cast<int64_t>(ti) * kGramTile, kGramTile);
    ext_b = detail::clamp_extent(blk.size - static_cast<int64_t>(tj) * kGramTile, kGramTile);
  } else {
    // Members: the leader and the blocks that continue its group (at most kGroupMax).
    if (tid < kGroupMax) {
      const int64_t b = w.block + tid;
      const bool ok = tid == 0 || (b < num_blocks && continues_group(layout, b - 1, b));
      const unsigned bal = dev::warp_ballot(ok);
      if (lane == 0) grp.ballot[warp] = bal;
    }
    __syncthreads();
    const int first = leading_ones(grp.ballot[0]);
    const int members = first < 32 ? first : 32 + leading_ones(grp.ballot[1]);
    if (tid < members) {
      const Block mb = load_block(layout, w.block + tid);
      grp.members[tid] = GroupMember{mb.offset, static_cast<int>(mb.start - blk.start),
                                     static_cast<int>(mb.size)};
    }
    __syncthreads();
    if (tid < kGramTile) {
      int owner = 0xFF;
      for (int p = 0; p < members; ++p)
        if (tid >= grp.members[p].lo && tid < grp.members[p].lo + grp.members[p].size) owner = p;
      grp.map[tid] = static_cast<unsigned char>(owner);
    }
    // (The barrier of the main loop orders these writes before the epilogue reads them.)
    const GroupMember& last = grp.members[members - 1];
    col_a = col_b = blk.start;
    ext_a = ext_b = last.lo + last.size;
  }
  const bool same = col_a == col_b;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && d % kVec == 0 &&
                   col_a % kVec == 0 && col_b % kVec == 0;

  double acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0;

  const int64_t slices = (m + kGK - 1) / kGK;
  if constexpr (sizeof(T) == 8) {
    // Three stages: slices k + 1 and k + 2 in flight while slice k is multiplied.
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (s < slices) {
        double* st = smem + s * 2 * kSlice;
        issue_slice(st, x, m, d, col_a, ext_a, s * kGK, vec);
        if (!same) issue_slice(st + kSlice, x, m, d, col_b, ext_b, s * kGK, vec);
      }
      dev::cp_async_commit();
    }
    for (int64_t k = 0; k < slices; ++k) {
      dev::cp_async_wait<1>();  // this thread's copies of slice k have landed
      __syncthreads();          // everyone's have; and everyone is done with slice k - 1
      if (k + 2 < slices) {
        double* st = smem + ((k + 2) % 3) * 2 * kSlice;
        issue_slice(st, x, m, d, col_a, ext_a, (k + 2) * kGK, vec);
        if (!same) issue_slice(st + kSlice, x, m, d, col_b, ext_b, (k + 2) * kGK, vec);
      }
      dev::cp_async_commit();
      const double* as = smem + (k % 3) * 2 * kSlice;
      mma_stage<kNative>(acc, as, same ? as : as + kSlice, wm0, wn0, g, t);
    }
    dev::cp_async_wait<0>();
  } else {
    Staged ra, rb;
    fetch_slice(ra, x, m, d, col_a, ext_a, 0, vec);
    if (!same) fetch_slice(rb, x, m, d, col_b, ext_b, 0, vec);
    store_slice(smem, ra, vec);
    if (!same) store_slice(smem + kSlice, rb, vec);
    __syncthreads();
    for (int64_t k = 0; k < slices; ++k) {
      const bool more = k + 1 < slices;
      if (more) {
        fetch_slice(ra, x, m, d, col_a, ext_a, (k + 1) * kGK, vec);
        if (!same) fetch_slice(rb, x, m, d, col_b, ext_b, (k + 1) * kGK, vec);
      }
      const double* as = smem + (k & 1) * 2 * kSlice;
      mma_stage<kNative>(acc, as, same ? as : as + kSlice, wm0, wn0, g, t);
      if (more) {
        double* st = smem + ((k + 1) & 1) * 2 * kSlice;
        store_slice(st, ra, vec);
        if (!same) store_slice(st + kSlice, rb, vec);
      }
      __syncthreads();
    }
  }

  // Epilogue: add the lower part of the tile (or the members' diagonal blocks) into gram.
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wm0 + 16 * i + g + 8 * (e >> 1);
        const int c = wn0 + 8 * j + 2 * t + (e & 1);
        if (w.tiles > 0) {
          const int64_t gi = static_cast<int64_t>(ti) * kGramTile + r;
          const int64_t gj = static_cast<int64_t>(tj) * kGramTile + c;
          if (gi < blk.size && gj <= gi) gram[blk.offset + gi * blk.size + gj] += acc[i][j][e];
        } else if (r < ext_a && c <= r) {
          const int mr = grp.map[r];
          if (mr == grp.map[c]) {
            const GroupMember& mb = grp.members[mr];
            gram[mb.offset + static_cast<int64_t>(r - mb.lo) * mb.size + (c - mb.lo)] +=
                acc[i][j][e];
          }
        }
      }
}

}  // namespace

size_t gram_accumulate_workspace_bytes(const int64_t* layout_host, int64_t num_blocks) {
  if (num_blocks <= 0) return 0;
  return Plan(layout_host, num_blocks, Keying::kGram).workspace_bytes();
}

template <typename T>
void gram_accumulate(const T* grads, int64_t m, int64_t d, const int64_t* layout_host,
                     const int64_t* layout_dev, int64_t num_blocks, double* gram, void* work,
                     size_t work_bytes, bool native_dmma, cudaStream_t stream) {
  if (m <= 0 || num_blocks <= 0) return;
  const Plan plan(layout_host, num_blocks, Keying::kGram);
  if (plan.empty()) return;
  DeviceGuard guard(gram);
  const int64_t* order = plan.build(layout_dev, num_blocks, work, work_bytes, stream);
  auto items = [](int key) -> int64_t {
    return key == 0 ? 1 : static_cast<int64_t>(key) * (key + 1) / 2;
  };
  auto kernel = native_dmma ? gram_tc_kernel<T, true> : gram_tc_kernel<T, false>;
  for (const auto& [table, n] : plan.tables(items, [](int) { return true; }))
    dev::launch(kernel, dim3(static_cast<unsigned>(n)), dim3(kGThreads), gram_smem_bytes<T>(),
                stream, grads, m, d, layout_dev, num_blocks, order, table, gram);
}

template void gram_accumulate<float>(const float*, int64_t, int64_t, const int64_t*,
                                     const int64_t*, int64_t, double*, void*, size_t, bool,
                                     cudaStream_t);
template void gram_accumulate<double>(const double*, int64_t, int64_t, const int64_t*,
                                      const int64_t*, int64_t, double*, void*, size_t, bool,
                                      cudaStream_t);

}  // namespace ssse::cuda::tc
