// pybind11 module ssse_ext._C: thin entry points over the raw-pointer kernels. The Python layer
// (ssse_ext/_ops.py) validates every tensor and allocates every buffer before calling in; here
// the arguments are re-checked cheaply, the dtype is dispatched and the GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "cpu/apply.h"
#include "cpu/gram.h"
#include "cpu/microkernel.h"
#include "cpu/sherman_morrison.h"

#ifdef SSSE_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/apply.cuh"
#include "cuda/gram.cuh"
#include "cuda/sherman_morrison.cuh"
#endif

namespace py = pybind11;

namespace {

enum DType : int { kFloat32 = 0, kFloat64 = 1 };

template <typename F>
void dispatch(int dtype, F&& f) {
  if (dtype == kFloat32) {
    f(float{});
  } else if (dtype == kFloat64) {
    f(double{});
  } else {
    throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64), got " +
                                std::to_string(dtype));
  }
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_common(int64_t num_blocks, int threads) {
  ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0, got " + std::to_string(num_blocks));
  ssse::check_arg(threads >= 1, "threads must be >= 1, got " + std::to_string(threads));
}

int cuda_device_count() {
#ifdef SSSE_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssse_ext kernels (C++/CUDA, torch-free); use the ssse_ext Python API";

  m.def("build_info", []() {
    py::dict info;
#ifdef SSSE_WITH_CUDA
    info["cuda_compiled"] = true;
    info["cuda_architectures"] = std::string(SSSE_CUDA_ARCHITECTURES);
    info["cuda_runtime_version"] = CUDART_VERSION;
#else
    info["cuda_compiled"] = false;
    info["cuda_architectures"] = std::string();
    info["cuda_runtime_version"] = 0;
#endif
    info["cuda_device_count"] = cuda_device_count();
    info["cpu_isa"] = std::string(ssse::cpu::detail::micro_kernel().isa);
    return info;
  });

  m.def(
      "gram_accumulate",
      [](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t layout,
         int64_t num_blocks, std::uintptr_t gram, int threads) {
        check_common(num_blocks, threads);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::gram_accumulate<T>(ptr<const T>(grads), m_rows, d, ptr<const int64_t>(layout),
                                        num_blocks, ptr<double>(gram), threads);
        });
      },
      py::arg("dtype"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("layout"),
      py::arg("num_blocks"), py::arg("gram"), py::arg("threads"));

  m.def(
      "inverse_from_gram",
      [](int dtype, std::uintptr_t gram, std::uintptr_t layout, int64_t num_blocks, double damping,
         double normalizer, std::uintptr_t out, std::uintptr_t info, int threads) {
        check_common(num_blocks, threads);
        ssse::check_arg(damping > 0, "damping must be > 0");
        ssse::check_arg(normalizer > 0, "normalizer must be > 0");
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::inverse_from_gram<T>(ptr<double>(gram), ptr<const int64_t>(layout),
                                          num_blocks, damping, normalizer, ptr<T>(out),
                                          ptr<int64_t>(info), threads);
        });
      },
      py::arg("dtype"), py::arg("gram"), py::arg("layout"), py::arg("num_blocks"),
      py::arg("damping"), py::arg("normalizer"), py::arg("out"), py::arg("info"),
      py::arg("threads"));

  m.def(
      "sherman_morrison",
      [](int dtype, bool chunked, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t grads, int64_t m_rows, int64_t d, double normalizer, int sign,
         std::uintptr_t info, int threads) {
        check_common(num_blocks, threads);
        ssse::check_arg(sign == 1 || sign == -1, "sign must be +1 or -1");
        ssse::check_arg(normalizer > 0, "normalizer must be > 0");
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          auto fn = chunked ? &ssse::cpu::sherman_morrison_chunk<T>
                            : &ssse::cpu::sherman_morrison_rank1<T>;
          fn(ptr<T>(inv), ptr<const int64_t>(layout), num_blocks, ptr<const T>(grads), m_rows, d,
             normalizer, sign, ptr<int64_t>(info), threads);
        });
      },
      py::arg("dtype"), py::arg("chunked"), py::arg("inv"), py::arg("layout"),
      py::arg("num_blocks"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("normalizer"),
      py::arg("sign"), py::arg("info"), py::arg("threads"));

  m.def(
      "apply_inverse",
      [](int dtype, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t v, int64_t d, int64_t r, std::uintptr_t base, double scale,
         std::uintptr_t out, int threads) {
        check_common(num_blocks, threads);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::apply_inverse<T>(ptr<const T>(inv), ptr<const int64_t>(layout), num_blocks,
                                      ptr<const T>(v), d, r, ptr<const T>(base), scale,
                                      ptr<T>(out), threads);
        });
      },
      py::arg("dtype"), py::arg("inv"), py::arg("layout"), py::arg("num_blocks"), py::arg("v"),
      py::arg("d"), py::arg("r"), py::arg("base"), py::arg("scale"), py::arg("out"),
      py::arg("threads"));

  // ---- CUDA entry points (same arguments plus the host copy of the layout and the stream) ----
#ifdef SSSE_WITH_CUDA
  auto stream_of = [](std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); };
  auto check_cuda_args = [](int64_t num_blocks, std::uintptr_t layout_host,
                            std::uintptr_t layout_dev) {
    ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0, got " + std::to_string(num_blocks));
    ssse::check_arg(num_blocks == 0 || (layout_host != 0 && layout_dev != 0),
                    "layout_host and layout_dev must be non-null when num_blocks > 0");
  };

  m.def(
      "gram_accumulate_cuda",
      [=](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t layout_host,
          std::uintptr_t layout_dev, int64_t num_blocks, std::uintptr_t gram,
          std::uintptr_t stream) {
        check_cuda_args(num_blocks, layout_host, layout_dev);
        ssse::check_arg(m_rows >= 0, "m must be >= 0, got " + std::to_string(m_rows));
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::gram_accumulate<T>(ptr<const T>(grads), m_rows, d,
                                         ptr<const int64_t>(layout_host),
                                         ptr<const int64_t>(layout_dev), num_blocks,
                                         ptr<double>(gram), stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("layout_host"),
      py::arg("layout_dev"), py::arg("num_blocks"), py::arg("gram"), py::arg("stream"));

  m.def(
      "inverse_from_gram_workspace_bytes",
      [](std::uintptr_t layout_host, int64_t num_blocks) {
        ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0");
        return ssse::cuda::inverse_from_gram_workspace_bytes(ptr<const int64_t>(layout_host),
                                                             num_blocks);
      },
      py::arg("layout_host"), py::arg("num_blocks"));

  m.def(
      "inverse_from_gram_cuda",
      [=](int dtype, std::uintptr_t gram, std::uintptr_t layout_host, std::uintptr_t layout_dev,
          int64_t num_blocks, double damping, double normalizer, std::uintptr_t out,
          std::uintptr_t info, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_cuda_args(num_blocks, layout_host, layout_dev);
        ssse::check_arg(damping > 0, "damping must be > 0");
        ssse::check_arg(normalizer > 0, "normalizer must be > 0");
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::inverse_from_gram<T>(ptr<double>(gram), ptr<const int64_t>(layout_host),
                                           ptr<const int64_t>(layout_dev), num_blocks, damping,
                                           normalizer, ptr<T>(out), ptr<int64_t>(info),
                                           ptr<void>(work), work_bytes, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("gram"), py::arg("layout_host"), py::arg("layout_dev"),
      py::arg("num_blocks"), py::arg("damping"), py::arg("normalizer"), py::arg("out"),
      py::arg("info"), py::arg("work"), py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "sherman_morrison_workspace_bytes",
      [](int dtype, bool chunked, std::uintptr_t layout_host, int64_t num_blocks, int64_t m_rows) {
        ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0");
        std::size_t bytes = 0;
        dispatch(dtype, [&](auto tag) {
          bytes = ssse::cuda::sherman_morrison_workspace_bytes(
              sizeof(decltype(tag)), chunked, ptr<const int64_t>(layout_host), num_blocks, m_rows);
        });
        return bytes;
      },
      py::arg("dtype"), py::arg("chunked"), py::arg("layout_host"), py::arg("num_blocks"),
      py::arg("m"));

  m.def(
      "sherman_morrison_cuda",
      [=](int dtype, bool chunked, std::uintptr_t inv, std::uintptr_t layout_host,
          std::uintptr_t layout_dev, int64_t num_blocks, std::uintptr_t grads, int64_t m_rows,
          int64_t d, double normalizer, int sign, std::uintptr_t info, std::uintptr_t work,
          std::size_t work_bytes, std::uintptr_t stream) {
        check_cuda_args(num_blocks, layout_host, layout_dev);
        ssse::check_arg(sign == 1 || sign == -1, "sign must be +1 or -1, got " + std::to_string(sign));
        ssse::check_arg(normalizer > 0, "normalizer must be > 0");
        ssse::check_arg(m_rows >= 0, "m must be >= 0, got " + std::to_string(m_rows));
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          auto fn = chunked ? &ssse::cuda::sherman_morrison_chunk<T>
                            : &ssse::cuda::sherman_morrison_rank1<T>;
          fn(ptr<T>(inv), ptr<const int64_t>(layout_host), ptr<const int64_t>(layout_dev),
             num_blocks, ptr<const T>(grads), m_rows, d, normalizer, sign, ptr<int64_t>(info),
             ptr<void>(work), work_bytes, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("chunked"), py::arg("inv"), py::arg("layout_host"),
      py::arg("layout_dev"), py::arg("num_blocks"), py::arg("grads"), py::arg("m"), py::arg("d"),
      py::arg("normalizer"), py::arg("sign"), py::arg("info"), py::arg("work"),
      py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "apply_inverse_cuda",
      [=](int dtype, std::uintptr_t inv, std::uintptr_t layout_host, std::uintptr_t layout_dev,
          int64_t num_blocks, std::uintptr_t v, int64_t d, int64_t r, std::uintptr_t base,
          double scale, std::uintptr_t out, std::uintptr_t stream) {
        check_cuda_args(num_blocks, layout_host, layout_dev);
        ssse::check_arg(out != v || out == 0, "out must not alias v");
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::apply_inverse<T>(ptr<const T>(inv), ptr<const int64_t>(layout_host),
                                       ptr<const int64_t>(layout_dev), num_blocks, ptr<const T>(v),
                                       d, r, ptr<const T>(base), scale, ptr<T>(out),
                                       stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("inv"), py::arg("layout_host"), py::arg("layout_dev"),
      py::arg("num_blocks"), py::arg("v"), py::arg("d"), py::arg("r"), py::arg("base"),
      py::arg("scale"), py::arg("out"), py::arg("stream"));
#endif
}
