// A small CUDA emulator for checking the logic of the tensor-core kernels on a machine without a
// GPU. Each thread of a block is a fiber (ucontext) on one host thread, switched only at barriers
// and warp collectives, so a block runs deterministically. What it checks:
//   * __syncthreads reached by every thread of the block (an exited or diverged thread deadlocks,
//     which is reported), warp collectives (mma, shuffle, ballot) by every lane of the warp and
//     of the same kind;
//   * cp.async: copies land only when the issuing thread waits for their group (reading a stage
//     before waiting gives stale data), addresses aligned to the copy size, the destination inside
//     the dynamic shared memory, nothing left pending when a thread exits;
//   * dynamic shared memory starts as NaN bytes and ends at a guard page (an overrun faults);
//   * launch limits: <= 1024 threads, <= 227 KiB dynamic shared memory, grid dimensions.
// Races between threads are not detected (compute-sanitizer's racecheck does that on a GPU).
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace emu {
namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "emu: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  int src_bytes;
};

enum Wait { kRunnable = 0, kBlockBarrier = 1, kWarpBarrier = 2 };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{};
  int linear = 0, warp = 0, lane = 0;
  bool done = false;
  Wait wait = kRunnable;
  unsigned wait_gen = 0;
  unsigned collectives = 0;
  std::deque<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

struct WarpState {
  int lanes = 32;
  int arrived = 0;
  unsigned gen = 0;
  uint64_t slot[2][32][3];
  int kind[2][32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  uint3 bid{};
  dim3 bdim, gdim;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int arrived = 0;
  unsigned gen = 0;
};

thread_local Block* g_block = nullptr;
thread_local int g_cur = -1;
thread_local ucontext_t g_main;
thread_local const std::function<void()>* g_body = nullptr;
cudaError_t g_last = cudaSuccess;
Stats g_stats{0, 0};

constexpr size_t kStack = 256 * 1024;

Fiber& cur() { return g_block->fibers[static_cast<size_t>(g_cur)]; }

void yield() {
  Fiber& f = cur();
  if (swapcontext(&f.ctx, &g_main) != 0) fail("swapcontext failed");
}

void fiber_main() {
  (*g_body)();
  Fiber& f = cur();
  if (!f.open.empty() || !f.groups.empty())
    fail("thread " + std::to_string(f.linear) + " exited with cp.async copies not waited for");
  f.done = true;
  yield();
  fail("a finished fiber was resumed");
}

void perform(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  }
}

// Warp barrier with an exchange of up to three 64-bit values per lane; returns this call's slot.
uint64_t (*collective(int kind, uint64_t v0, uint64_t v1, uint64_t v2))[3] {
  Fiber& f = cur();
  WarpState& w = g_block->warps[static_cast<size_t>(f.warp)];
  const int p = static_cast<int>(f.collectives++ & 1u);
  w.slot[p][f.lane][0] = v0;
  w.slot[p][f.lane][1] = v1;
  w.slot[p][f.lane][2] = v2;
  w.kind[p][f.lane] = kind;
  const unsigned gen = w.gen;
  if (++w.arrived == w.lanes) {
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = kWarpBarrier;
    f.wait_gen = gen;
    yield();
  }
  for (int l = 0; l < w.lanes; ++l)
    if (w.kind[p][l] != kind)
      fail("warp " + std::to_string(f.warp) + ": lanes reached different collectives (" +
           std::to_string(kind) + " vs " + std::to_string(w.kind[p][l]) + ")");
  return w.slot[p];
}

bool runnable(const Block& b, const Fiber& f) {
  if (f.done) return false;
  switch (f.wait) {
    case kBlockBarrier:
      return b.gen != f.wait_gen;
    case kWarpBarrier:
      return b.warps[static_cast<size_t>(f.warp)].gen != f.wait_gen;
    default:
      return true;
  }
}

struct SmemArena {
  unsigned char* base = nullptr;
  size_t mapped = 0;
  unsigned char* guard = nullptr;
  ~SmemArena() {
    if (base) munmap(base, mapped);
  }
  unsigned char* get(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t need = (bytes + page - 1) / page * page + page;
    if (need > mapped) {
      if (base) munmap(base, mapped);
      void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail("mmap of shared memory failed");
      base = static_cast<unsigned char*>(p);
      mapped = need;
      guard = base + need - page;
      if (mprotect(guard, page, PROT_NONE) != 0) fail("mprotect failed");
    }
    // The region ends exactly at the guard page (16-byte granularity).
    const size_t rounded = (bytes + 15) / 16 * 16;
    return guard - rounded;
  }
};

}  // namespace

const uint3& thread_idx() { return cur().tid; }
const uint3& block_idx() { return g_block->bid; }
const dim3& block_dim() { return g_block->bdim; }
const dim3& grid_dim() { return g_block->gdim; }

void syncthreads() {
  Block& b = *g_block;
  Fiber& f = cur();
  const unsigned gen = b.gen;
  if (++b.arrived == static_cast<int>(b.fibers.size())) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.wait = kBlockBarrier;
  f.wait_gen = gen;
  yield();
}

void syncwarp() { collective(1, 0, 0, 0); }

unsigned ballot(bool p) {
  auto slot = collective(2, p ? 1u : 0u, 0, 0);
  const WarpState& w = g_block->warps[static_cast<size_t>(cur().warp)];
  unsigned r = 0;
  for (int l = 0; l < w.lanes; ++l)
    if (slot[l][0]) r |= 1u << l;
  return r;
}

uint64_t shuffle(uint64_t value, int arg, bool xor_mode) {
  Fiber& f = cur();
  auto slot = collective(3, value, 0, 0);
  const WarpState& w = g_block->warps[static_cast<size_t>(f.warp)];
  int src = xor_mode ? (f.lane ^ arg) : arg;
  src &= 31;
  if (src >= w.lanes) return value;
  return slot[src][0];
}

void dmma_16x8x4(double (&d)[4], double a0, double a1, double b0) {
  Fiber& f = cur();
  if (g_block->warps[static_cast<size_t>(f.warp)].lanes != 32) fail("mma in a partial warp");
  uint64_t u0, u1, u2;
  std::memcpy(&u0, &a0, 8);
  std::memcpy(&u1, &a1, 8);
  std::memcpy(&u2, &b0, 8);
  auto slot = collective(4, u0, u1, u2);
  auto value = [&](int lane, int which) {
    double x;
    std::memcpy(&x, &slot[lane][which], 8);
    return x;
  };
  const int g = f.lane >> 2, t = f.lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    for (int k = 0; k < 4; ++k) {
      // A[row][k] is held by lane (row % 8) * 4 + k (a0 for rows < 8, a1 above);
      // B[k][col] by lane col * 4 + k.
      const double a = value((row & 7) * 4 + k, row < 8 ? 0 : 1);
      const double b = value(col * 4 + k, 2);
      d[i] = std::fma(a, b, d[i]);
    }
  }
}

void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes) {
  Block& b = *g_block;
  unsigned char* dst = static_cast<unsigned char*>(smem_dst);
  if (dst < b.smem || dst + bytes > b.smem + b.smem_bytes)
    fail("cp.async destination outside the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0)
    fail("cp.async destination not aligned to " + std::to_string(bytes) + " bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async src-size out of range");
  if (src_bytes > 0 &&
      reinterpret_cast<uintptr_t>(gmem_src) % static_cast<uintptr_t>(bytes) != 0)
    fail("cp.async source not aligned to " + std::to_string(bytes) + " bytes");
  if (gmem_src == nullptr) fail("cp.async from a null pointer");
  cur().open.push_back(Copy{dst, static_cast<const unsigned char*>(gmem_src), bytes, src_bytes});
}

void cp_async_commit() {
  Fiber& f = cur();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = cur();
  while (static_cast<int>(f.groups.size()) > pending) {
    perform(f.groups.front());
    f.groups.pop_front();
  }
}

unsigned char* dynamic_smem() { return g_block->smem; }

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024) fail("block of " + std::to_string(threads) + " threads");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    fail("bad grid dimensions");
  if (smem_bytes > 227 * 1024) fail("dynamic shared memory of " + std::to_string(smem_bytes));
  static SmemArena arena;
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<long>(stacks.size()) < threads) stacks.emplace_back(new char[kStack]);

  ++g_stats.launches;
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.smem_bytes = smem_bytes;
  b.smem = arena.get(std::max<size_t>(smem_bytes, 16));
  b.fibers.resize(static_cast<size_t>(threads));
  const int nwarps = static_cast<int>((threads + 31) / 32);
  b.warps.resize(static_cast<size_t>(nwarps));
  for (int w = 0; w < nwarps; ++w)
    b.warps[static_cast<size_t>(w)].lanes = static_cast<int>(std::min<long>(32, threads - 32L * w));
  g_block = &b;
  g_body = &body;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++g_stats.blocks;
        b.bid = uint3{bx, by, bz};
        b.arrived = 0;
        std::memset(b.smem, 0xFF, smem_bytes);  // NaN everywhere until written
        for (auto& w : b.warps) w.arrived = 0;
        for (long i = 0; i < threads; ++i) {
          Fiber& f = b.fibers[static_cast<size_t>(i)];
          f.linear = static_cast<int>(i);
          f.tid = uint3{static_cast<unsigned>(i % block.x),
                        static_cast<unsigned>((i / block.x) % block.y),
                        static_cast<unsigned>(i / (static_cast<long>(block.x) * block.y))};
          f.warp = static_cast<int>(i / 32);
          f.lane = static_cast<int>(i % 32);
          f.done = false;
          f.wait = kRunnable;
          f.collectives = 0;
          f.groups.clear();
          f.open.clear();
          f.stack = stacks[static_cast<size_t>(i)].get();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_main, 0);
        }
        long finished = 0;
        while (finished < threads) {
          bool progressed = false;
          finished = 0;
          for (long i = 0; i < threads; ++i) {
            Fiber& f = b.fibers[static_cast<size_t>(i)];
            if (f.done) {
              ++finished;
              continue;
            }
            if (!runnable(b, f)) continue;
            f.wait = kRunnable;
            g_cur = static_cast<int>(i);
            if (swapcontext(&g_main, &f.ctx) != 0) fail("swapcontext failed");
            g_cur = -1;
            progressed = true;
            if (f.done) ++finished;
          }
          if (!progressed && finished < threads) {
            long at_block = 0, at_warp = 0;
            for (const Fiber& f : b.fibers) {
              if (f.done) continue;
              if (f.wait == kBlockBarrier) ++at_block;
              if (f.wait == kWarpBarrier) ++at_warp;
            }
            fail("deadlock in block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                 std::to_string(bz) + "): " + std::to_string(at_block) +
                 " threads at __syncthreads, " + std::to_string(at_warp) +
                 " at a warp collective, " + std::to_string(finished) + " exited");
          }
        }
      }
  g_block = nullptr;
  g_body = nullptr;
}

Stats stats() { return g_stats; }

}  // namespace emu

const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last;
  emu::g_last = cudaSuccess;
  return e;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes > 0 && p == nullptr) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
