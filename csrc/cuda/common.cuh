// Error handling shared by the CUDA kernels: every CUDA call's status becomes a C++ exception
// (a Python RuntimeError through pybind11) that names the call and the error.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define SSSE_CUDA_CHECK(expr)                                                              \
  do {                                                                                     \
    const cudaError_t ssse_err_ = (expr);                                                  \
    if (ssse_err_ != cudaSuccess)                                                          \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +              \
                               cudaGetErrorString(ssse_err_));                             \
  } while (0)

// After a kernel launch: reports launch-configuration errors without synchronising.
#define SSSE_CUDA_CHECK_LAUNCH() SSSE_CUDA_CHECK(cudaGetLastError())
