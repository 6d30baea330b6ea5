// The emulated device behind tests/cuda_emu/include/cuda_runtime.h (see emu.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

namespace emu {

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();
void syncwarp();
unsigned ballot(bool p);
// Lane `arg` (or lane ^ arg when xor_mode) of this warp's `value`s.
uint64_t shuffle(uint64_t value, int arg, bool xor_mode);
// mma.m16n8k4 with float64 fragments (the PTX ISA layout), one warp.
void dmma_16x8x4(double (&d)[4], double a0, double a1, double b0);

void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

unsigned char* dynamic_smem();

// Runs body() as every thread of every block of the grid; aborts with a message on a deadlock
// (barrier not reached by every thread, diverged warp collective), on a cp.async left pending at
// exit or a misaligned one, and on launch limits (1024 threads, 227 KiB of shared memory).
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

// Counters for tests: launches and blocks run since the start.
struct Stats {
  long launches;
  long blocks;
};
Stats stats();

}  // namespace emu
