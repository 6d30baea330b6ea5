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

namespace ssse::cuda {

// Makes the device that owns `ptr` current for the scope: the caller's tensors may live on a
// device other than this runtime's current one, and a launch must match its stream's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    if (ptr == nullptr) return;
    cudaPointerAttributes attr{};
    SSSE_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type != cudaMemoryTypeDevice) return;
    SSSE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (attr.device != previous_) {
      SSSE_CUDA_CHECK(cudaSetDevice(attr.device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace ssse::cuda
