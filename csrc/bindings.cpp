// pybind11 module ssse_ext._C: thin entry points over the raw-pointer kernels. The Python layer
// (ssse_ext/_ops.py) validates every tensor and allocates every buffer before calling in; here
// the arguments are re-checked cheaply, the dtype is dispatched and the GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "common.h"
#include "cpu/apply.h"
#include "cpu/dual.h"
#include "cpu/gram.h"
#include "cpu/microkernel.h"
#include "cpu/sherman_morrison.h"
#include "cpu/woodbury.h"

#ifdef SSSE_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/apply.cuh"
#include "cuda/dual.cuh"
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

// ---- argument checks shared by the CPU and CUDA entry points (same conditions, same messages) ----
std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", x);
  return buf;
}

void check_blocks(int64_t num_blocks) {
  ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0, got " + std::to_string(num_blocks));
}

void check_threads(int threads) {
  ssse::check_arg(threads >= 1, "threads must be >= 1, got " + std::to_string(threads));
}

// ---- the dual-block entry points: the same checks on the CPU and CUDA side ----------------

// rows stored rows of capacity ldl (the leading dimension of every factor).
void check_dual_storage(int64_t num_blocks, int64_t rows, int64_t ldl) {
  ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0, got " + std::to_string(num_blocks));
  ssse::check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  ssse::check_arg(ldl >= rows, "ldl must be >= rows = " + std::to_string(rows) + ", got " +
                                   std::to_string(ldl));
}

void check_dual_gram(int64_t num_blocks, int64_t m, int64_t d, int64_t r0, int64_t ldl) {
  check_dual_storage(num_blocks, r0, ldl);
  ssse::check_arg(m >= 0, "m must be >= 0, got " + std::to_string(m));
  ssse::check_arg(d >= 0, "d must be >= 0, got " + std::to_string(d));
  ssse::check_arg(r0 + m <= ldl, "r0 + m must be <= ldl = " + std::to_string(ldl) + ", got " +
                                     std::to_string(r0) + " + " + std::to_string(m));
}

void check_dual_cholesky(int64_t num_blocks, int64_t r0, int64_t r1, int64_t ldl, double shift) {
  check_dual_storage(num_blocks, r0, ldl);
  ssse::check_arg(r1 >= r0 && r1 <= ldl, "r1 must be in [r0, ldl] = [" + std::to_string(r0) +
                                             ", " + std::to_string(ldl) + "], got " +
                                             std::to_string(r1));
  ssse::check_arg(shift >= 0 && std::isfinite(shift),
                  "shift must be a finite number >= 0, got " + num(shift));
}

void check_dual_apply(int64_t num_blocks, int64_t rows, int64_t ldl, double damping, int64_t d,
                      int64_t r, double scale) {
  check_dual_storage(num_blocks, rows, ldl);
  ssse::check_arg(damping > 0 && std::isfinite(damping),
                  "damping must be a finite number > 0, got " + num(damping));
  ssse::check_arg(d >= 0 && r >= 0, "v must have a non-negative shape, got (" +
                                        std::to_string(d) + ", " + std::to_string(r) + ")");
  ssse::check_arg(std::isfinite(scale), "scale must be finite, got " + num(scale));
}

void check_dual_remove(int64_t num_blocks, int64_t rows, int64_t ldl, int64_t k, int64_t first) {
  check_dual_storage(num_blocks, rows, ldl);
  ssse::check_arg(k >= 0 && k <= rows, "k must be in [0, rows] = [0, " + std::to_string(rows) +
                                           "], got " + std::to_string(k));
  ssse::check_arg(first >= 0 && (k == 0 || first < rows),
                  "first must be in [0, rows) = [0, " + std::to_string(rows) + "), got " +
                      std::to_string(first));
}

void check_rows(int64_t m, int64_t d) {
  ssse::check_arg(m >= 0, "m must be >= 0, got " + std::to_string(m));
  ssse::check_arg(d >= 0, "d must be >= 0, got " + std::to_string(d));
}

void check_inverse_args(double damping, double normalizer) {
  ssse::check_arg(damping > 0, "damping must be > 0, got " + num(damping));
  ssse::check_arg(normalizer > 0, "normalizer must be > 0, got " + num(normalizer));
}

void check_update_args(int64_t m, int64_t d, double normalizer, int sign) {
  check_rows(m, d);
  ssse::check_arg(sign == 1 || sign == -1, "sign must be +1 or -1, got " + std::to_string(sign));
  ssse::check_arg(normalizer > 0, "normalizer must be > 0, got " + num(normalizer));
}

void check_apply_args(int64_t d, int64_t r, std::uintptr_t v, std::uintptr_t out) {
  ssse::check_arg(d >= 0, "d must be >= 0, got " + std::to_string(d));
  ssse::check_arg(r >= 0, "r must be >= 0, got " + std::to_string(r));
  ssse::check_arg(out == 0 || out != v,
                  "out must not alias v (both at address " + std::to_string(out) + ")");
}

// ---- the CUDA kernel set ------------------------------------------------------------------------
// simt: the SIMT kernels verified on an H200 (2026-11-27). tc: float64 tensor-core kernels (Gram,
// blocked inverse, Woodbury update) and a vectorised apply; tc-m8n8k4: tc with the Gram's DMMA
// issued as mma.m8n8k4 pairs even on sm_90 (to measure against the native m16n8k4).
// The default stays simt until a GPU run has verified tc (tests/test_cuda*.py under both sets).
enum class KernelSet : int { kSimt = 0, kTc = 1, kTcM8n8k4 = 2 };
KernelSet g_kernels = KernelSet::kSimt;

const char* kernel_set_name(KernelSet k) {
  switch (k) {
    case KernelSet::kTc:
      return "tc";
    case KernelSet::kTcM8n8k4:
      return "tc-m8n8k4";
    default:
      return "simt";
  }
}

[[maybe_unused]] bool tensor_cores() { return g_kernels != KernelSet::kSimt; }

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

  m.def(
      "set_cuda_kernels",
      [](const std::string& name) {
        if (name == "simt")
          g_kernels = KernelSet::kSimt;
        else if (name == "tc")
          g_kernels = KernelSet::kTc;
        else if (name == "tc-m8n8k4")
          g_kernels = KernelSet::kTcM8n8k4;
        else
          throw std::invalid_argument("CUDA kernel set must be 'simt', 'tc' or 'tc-m8n8k4', got '" +
                                      name + "'");
      },
      py::arg("name"), "Selects the CUDA kernels of later calls: 'simt' (default), 'tc', 'tc-m8n8k4'.");
  m.def("cuda_kernels", []() { return std::string(kernel_set_name(g_kernels)); },
        "The CUDA kernel set in use.");

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
    info["cuda_kernels"] = std::string(kernel_set_name(g_kernels));
    info["cpu_isa"] = std::string(ssse::cpu::detail::micro_kernel().isa);
    return info;
  });

  m.def(
      "gram_accumulate",
      [](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t layout,
         int64_t num_blocks, std::uintptr_t gram, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_rows(m_rows, d);
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
        check_blocks(num_blocks);
        check_threads(threads);
        check_inverse_args(damping, normalizer);
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
      "gram_product",
      [](std::uintptr_t gram, std::uintptr_t layout, int64_t num_blocks, std::uintptr_t x,
         int64_t r, std::uintptr_t out, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        if (r < 0) throw std::invalid_argument("r must be >= 0");
        py::gil_scoped_release release;
        ssse::cpu::gram_product(ptr<const double>(gram), ptr<const int64_t>(layout), num_blocks,
                                ptr<const double>(x), r, ptr<double>(out), threads);
      },
      py::arg("gram"), py::arg("layout"), py::arg("num_blocks"), py::arg("x"), py::arg("r"),
      py::arg("out"), py::arg("threads"));

  m.def(
      "rows_product",
      [](int dtype, std::uintptr_t rows, int64_t m, int64_t d, std::uintptr_t layout,
         int64_t num_blocks, std::uintptr_t x, int64_t r, double sign, std::uintptr_t sketch,
         int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_rows(m, d);
        ssse::check_arg(r >= 0, "r must be >= 0, got " + std::to_string(r));
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::rows_product<T>(ptr<const T>(rows), m, d, ptr<const int64_t>(layout),
                                     num_blocks, ptr<const double>(x), r, sign,
                                     ptr<double>(sketch), threads);
        });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("m"), py::arg("d"), py::arg("layout"),
      py::arg("num_blocks"), py::arg("x"), py::arg("r"), py::arg("sign"), py::arg("sketch"),
      py::arg("threads"));

  m.def(
      "sherman_morrison",
      [](int dtype, bool chunked, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t grads, int64_t m_rows, int64_t d, double normalizer, int sign,
         std::uintptr_t info, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_update_args(m_rows, d, normalizer, sign);
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
      "woodbury_check",
      [](int dtype, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t rows, int64_t k, int64_t d, double normalizer, int sign, std::uintptr_t wt,
         std::uintptr_t pivots, std::uintptr_t info, int threads, std::uintptr_t vecs, int64_t r,
         bool changed, std::uintptr_t out, int64_t out_start, int rows_dtype) {
        check_blocks(num_blocks);
        if (rows_dtype < 0) rows_dtype = dtype;
        ssse::check_arg(rows_dtype == dtype || (dtype == kFloat64 && rows_dtype == kFloat32),
                        "rows must be in the inverse's dtype, or float32 for float64 blocks");
        check_threads(threads);
        check_update_args(k, d, normalizer, sign);
        ssse::check_arg(r >= 0, "r must be >= 0, got " + std::to_string(r));
        ssse::check_arg(r == 0 || (vecs != 0 && out != 0), "r > 0 needs vecs and out");
        ssse::check_arg(out_start >= 0 && out_start <= d,
                        "out_start must be in [0, d], got " + std::to_string(out_start));
        if (r > 0) {  // out's first row: at or before every block's
          const int64_t* table = ptr<const int64_t>(layout);
          for (int64_t b = 0; b < num_blocks; ++b)
            ssse::check_arg(table[3 * b + 1] == 0 || table[3 * b] >= out_start,
                            "out_start must be at or before every block's start");
        }
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          auto run = [&](auto rows_tag) {
            using R = decltype(rows_tag);
            ssse::cpu::woodbury_check<T, R>(ptr<const T>(inv), ptr<const int64_t>(layout),
                                            num_blocks, ptr<const R>(rows), k, d, normalizer,
                                            sign, ptr<double>(wt), ptr<double>(pivots),
                                            ptr<int64_t>(info), threads, ptr<const T>(vecs), r,
                                            changed, ptr<double>(out), out_start);
          };
          if constexpr (std::is_same_v<T, double>) {
            if (rows_dtype == kFloat32) return run(float{});
          }
          run(T{});
        });
      },
      py::arg("dtype"), py::arg("inv"), py::arg("layout"), py::arg("num_blocks"),
      py::arg("rows"), py::arg("k"), py::arg("d"), py::arg("normalizer"), py::arg("sign"),
      py::arg("wt"), py::arg("pivots"), py::arg("info"), py::arg("threads"),
      py::arg("vecs") = 0, py::arg("r") = 0, py::arg("changed") = false, py::arg("out") = 0,
      py::arg("out_start") = 0, py::arg("rows_dtype") = -1);

  m.def(
      "woodbury_write",
      [](int dtype, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t wt, int64_t k, int sign, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        ssse::check_arg(k >= 0, "k must be >= 0, got " + std::to_string(k));
        ssse::check_arg(sign == 1 || sign == -1, "sign must be +1 or -1, got " +
                                                     std::to_string(sign));
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::woodbury_write<T>(ptr<T>(inv), ptr<const int64_t>(layout), num_blocks,
                                       ptr<const double>(wt), k, sign, threads);
        });
      },
      py::arg("dtype"), py::arg("inv"), py::arg("layout"), py::arg("num_blocks"), py::arg("wt"),
      py::arg("k"), py::arg("sign"), py::arg("threads"));

  m.def(
      "apply_inverse",
      [](int dtype, std::uintptr_t inv, std::uintptr_t layout, int64_t num_blocks,
         std::uintptr_t v, int64_t d, int64_t r, std::uintptr_t base, double scale,
         std::uintptr_t out, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_apply_args(d, r, v, out);
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

  m.def(
      "dual_gram",
      [](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t table,
         int64_t num_blocks, int64_t r0, std::uintptr_t g, std::uintptr_t l, int64_t ldl,
         int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_dual_gram(num_blocks, m_rows, d, r0, ldl);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::dual_gram<T>(ptr<const T>(grads), m_rows, d, ptr<const int64_t>(table),
                                  num_blocks, r0, ptr<T>(g), ptr<double>(l), ldl, threads);
        });
      },
      py::arg("dtype"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("table"),
      py::arg("num_blocks"), py::arg("r0"), py::arg("g"), py::arg("l"), py::arg("ldl"),
      py::arg("threads"));

  m.def(
      "dual_cholesky",
      [](std::uintptr_t l, std::uintptr_t table, int64_t num_blocks, int64_t r0, int64_t r1,
         int64_t ldl, double shift, bool strip_solved, std::uintptr_t info, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_dual_cholesky(num_blocks, r0, r1, ldl, shift);
        py::gil_scoped_release release;
        ssse::cpu::dual_cholesky(ptr<double>(l), ptr<const int64_t>(table), num_blocks, r0, r1,
                                 ldl, shift, strip_solved, ptr<int64_t>(info), threads);
      },
      py::arg("l"), py::arg("table"), py::arg("num_blocks"), py::arg("r0"), py::arg("r1"),
      py::arg("ldl"), py::arg("shift"), py::arg("strip_solved"), py::arg("info"),
      py::arg("threads"));

  m.def(
      "dual_apply",
      [](int dtype, std::uintptr_t g, std::uintptr_t l, std::uintptr_t table, int64_t num_blocks,
         int64_t rows, int64_t ldl, double damping, std::uintptr_t v, int64_t d, int64_t r,
         std::uintptr_t base, double scale, std::uintptr_t out, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_dual_apply(num_blocks, rows, ldl, damping, d, r, scale);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::dual_apply<T>(ptr<const T>(g), ptr<const double>(l),
                                   ptr<const int64_t>(table), num_blocks, rows, ldl, damping,
                                   ptr<const T>(v), d, r, ptr<const T>(base), scale, ptr<T>(out),
                                   threads);
        });
      },
      py::arg("dtype"), py::arg("g"), py::arg("l"), py::arg("table"), py::arg("num_blocks"),
      py::arg("rows"), py::arg("ldl"), py::arg("damping"), py::arg("v"), py::arg("d"),
      py::arg("r"), py::arg("base"), py::arg("scale"), py::arg("out"), py::arg("threads"));

  m.def(
      "dual_remove_rows",
      [](int dtype, std::uintptr_t g, std::uintptr_t l, std::uintptr_t table, int64_t num_blocks,
         int64_t rows, int64_t ldl, std::uintptr_t keep, std::uintptr_t removed, int64_t k,
         int64_t first, std::uintptr_t info, int threads) {
        check_blocks(num_blocks);
        check_threads(threads);
        check_dual_remove(num_blocks, rows, ldl, k, first);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cpu::dual_remove_rows<T>(ptr<T>(g), ptr<double>(l), ptr<const int64_t>(table),
                                         num_blocks, rows, ldl, ptr<const int64_t>(keep),
                                         ptr<const int64_t>(removed), k, first,
                                         ptr<int64_t>(info), threads);
        });
      },
      py::arg("dtype"), py::arg("g"), py::arg("l"), py::arg("table"), py::arg("num_blocks"),
      py::arg("rows"), py::arg("ldl"), py::arg("keep"), py::arg("removed"), py::arg("k"),
      py::arg("first"), py::arg("info"), py::arg("threads"));

  // ---- CUDA entry points (same arguments plus the host copy of the layout, a device workspace
  // where the kernel set needs one, and the stream); the kernel set is read at each call ----
#ifdef SSSE_WITH_CUDA
  auto stream_of = [](std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); };
  auto check_tables = [](int64_t num_blocks, std::uintptr_t layout_host, std::uintptr_t layout_dev) {
    check_blocks(num_blocks);
    ssse::check_arg(num_blocks == 0 || (layout_host != 0 && layout_dev != 0),
                    "layout_host and layout_dev must be non-null when num_blocks > 0, got " +
                        std::to_string(layout_host) + " and " + std::to_string(layout_dev) +
                        " for " + std::to_string(num_blocks) + " blocks");
  };

  m.def(
      "gram_accumulate_workspace_bytes",
      [](std::uintptr_t layout_host, int64_t num_blocks) -> std::size_t {
        check_blocks(num_blocks);
        if (!tensor_cores()) return 0;
        return ssse::cuda::tc::gram_accumulate_workspace_bytes(ptr<const int64_t>(layout_host),
                                                               num_blocks);
      },
      py::arg("layout_host"), py::arg("num_blocks"));

  m.def(
      "gram_accumulate_cuda",
      [=](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t layout_host,
          std::uintptr_t layout_dev, int64_t num_blocks, std::uintptr_t gram, std::uintptr_t work,
          std::size_t work_bytes, std::uintptr_t stream) {
        check_tables(num_blocks, layout_host, layout_dev);
        check_rows(m_rows, d);
        const KernelSet kernels = g_kernels;
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          if (kernels == KernelSet::kSimt)
            ssse::cuda::gram_accumulate<T>(ptr<const T>(grads), m_rows, d,
                                           ptr<const int64_t>(layout_host),
                                           ptr<const int64_t>(layout_dev), num_blocks,
                                           ptr<double>(gram), stream_of(stream));
          else
            ssse::cuda::tc::gram_accumulate<T>(
                ptr<const T>(grads), m_rows, d, ptr<const int64_t>(layout_host),
                ptr<const int64_t>(layout_dev), num_blocks, ptr<double>(gram), ptr<void>(work),
                work_bytes, kernels == KernelSet::kTc, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("layout_host"),
      py::arg("layout_dev"), py::arg("num_blocks"), py::arg("gram"), py::arg("work"),
      py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "inverse_from_gram_workspace_bytes",
      [](std::uintptr_t layout_host, int64_t num_blocks) -> std::size_t {
        check_blocks(num_blocks);
        return tensor_cores() ? ssse::cuda::tc::inverse_from_gram_workspace_bytes(
                                    ptr<const int64_t>(layout_host), num_blocks)
                              : ssse::cuda::inverse_from_gram_workspace_bytes(
                                    ptr<const int64_t>(layout_host), num_blocks);
      },
      py::arg("layout_host"), py::arg("num_blocks"));

  m.def(
      "inverse_from_gram_cuda",
      [=](int dtype, std::uintptr_t gram, std::uintptr_t layout_host, std::uintptr_t layout_dev,
          int64_t num_blocks, double damping, double normalizer, std::uintptr_t out,
          std::uintptr_t info, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_tables(num_blocks, layout_host, layout_dev);
        check_inverse_args(damping, normalizer);
        const bool tc = tensor_cores();
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          auto fn = tc ? &ssse::cuda::tc::inverse_from_gram<T> : &ssse::cuda::inverse_from_gram<T>;
          fn(ptr<double>(gram), ptr<const int64_t>(layout_host), ptr<const int64_t>(layout_dev),
             num_blocks, damping, normalizer, ptr<T>(out), ptr<int64_t>(info), ptr<void>(work),
             work_bytes, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("gram"), py::arg("layout_host"), py::arg("layout_dev"),
      py::arg("num_blocks"), py::arg("damping"), py::arg("normalizer"), py::arg("out"),
      py::arg("info"), py::arg("work"), py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "sherman_morrison_workspace_bytes",
      [](int dtype, bool chunked, std::uintptr_t layout_host, int64_t num_blocks) {
        check_blocks(num_blocks);
        std::size_t bytes = 0;
        dispatch(dtype, [&](auto tag) {
          if (chunked && tensor_cores())
            bytes = ssse::cuda::tc::sherman_morrison_chunk_workspace_bytes(
                ptr<const int64_t>(layout_host), num_blocks);
          else
            bytes = ssse::cuda::sherman_morrison_workspace_bytes(
                sizeof(decltype(tag)), chunked, ptr<const int64_t>(layout_host), num_blocks);
        });
        return bytes;
      },
      py::arg("dtype"), py::arg("chunked"), py::arg("layout_host"), py::arg("num_blocks"));

  m.def(
      "sherman_morrison_cuda",
      [=](int dtype, bool chunked, std::uintptr_t inv, std::uintptr_t layout_host,
          std::uintptr_t layout_dev, int64_t num_blocks, std::uintptr_t grads, int64_t m_rows,
          int64_t d, double normalizer, int sign, std::uintptr_t info, std::uintptr_t work,
          std::size_t work_bytes, std::uintptr_t stream) {
        check_tables(num_blocks, layout_host, layout_dev);
        check_update_args(m_rows, d, normalizer, sign);
        const bool tc = tensor_cores();
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          // The literal rank-1 recurrence has one kernel set (it is not BLAS-3).
          auto fn = !chunked ? &ssse::cuda::sherman_morrison_rank1<T>
                    : tc     ? &ssse::cuda::tc::sherman_morrison_chunk<T>
                             : &ssse::cuda::sherman_morrison_chunk<T>;
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
      "apply_inverse_workspace_bytes",
      [](std::uintptr_t layout_host, int64_t num_blocks) -> std::size_t {
        check_blocks(num_blocks);
        if (!tensor_cores()) return 0;
        return ssse::cuda::tc::apply_inverse_workspace_bytes(ptr<const int64_t>(layout_host),
                                                             num_blocks);
      },
      py::arg("layout_host"), py::arg("num_blocks"));

  m.def(
      "apply_inverse_cuda",
      [=](int dtype, std::uintptr_t inv, std::uintptr_t layout_host, std::uintptr_t layout_dev,
          int64_t num_blocks, std::uintptr_t v, int64_t d, int64_t r, std::uintptr_t base,
          double scale, std::uintptr_t out, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_tables(num_blocks, layout_host, layout_dev);
        check_apply_args(d, r, v, out);
        const bool tc = tensor_cores();
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          if (tc)
            ssse::cuda::tc::apply_inverse<T>(
                ptr<const T>(inv), ptr<const int64_t>(layout_host), ptr<const int64_t>(layout_dev),
                num_blocks, ptr<const T>(v), d, r, ptr<const T>(base), scale, ptr<T>(out),
                ptr<void>(work), work_bytes, stream_of(stream));
          else
            ssse::cuda::apply_inverse<T>(ptr<const T>(inv), ptr<const int64_t>(layout_host),
                                         ptr<const int64_t>(layout_dev), num_blocks,
                                         ptr<const T>(v), d, r, ptr<const T>(base), scale,
                                         ptr<T>(out), stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("inv"), py::arg("layout_host"), py::arg("layout_dev"),
      py::arg("num_blocks"), py::arg("v"), py::arg("d"), py::arg("r"), py::arg("base"),
      py::arg("scale"), py::arg("out"), py::arg("work"), py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "dual_gram_cuda",
      [=](int dtype, std::uintptr_t grads, int64_t m_rows, int64_t d, std::uintptr_t table_host,
          std::uintptr_t table_dev, int64_t num_blocks, int64_t r0, std::uintptr_t g,
          std::uintptr_t l, int64_t ldl, std::uintptr_t stream) {
        check_tables(num_blocks, table_host, table_dev);
        check_dual_gram(num_blocks, m_rows, d, r0, ldl);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::dual_gram<T>(ptr<const T>(grads), m_rows, d, ptr<const int64_t>(table_host),
                                   ptr<const int64_t>(table_dev), num_blocks, r0, ptr<T>(g),
                                   ptr<double>(l), ldl, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("grads"), py::arg("m"), py::arg("d"), py::arg("table_host"),
      py::arg("table_dev"), py::arg("num_blocks"), py::arg("r0"), py::arg("g"), py::arg("l"),
      py::arg("ldl"), py::arg("stream"));

  m.def(
      "dual_cholesky_workspace_bytes",
      [](int64_t num_blocks) {
        ssse::check_arg(num_blocks >= 0, "num_blocks must be >= 0, got " +
                                             std::to_string(num_blocks));
        return ssse::cuda::dual_cholesky_workspace_bytes(num_blocks);
      },
      py::arg("num_blocks"));

  m.def(
      "dual_cholesky_cuda",
      [=](std::uintptr_t l, std::uintptr_t table_host, std::uintptr_t table_dev,
          int64_t num_blocks, int64_t r0, int64_t r1, int64_t ldl, double shift,
          bool strip_solved, std::uintptr_t info, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_tables(num_blocks, table_host, table_dev);
        check_dual_cholesky(num_blocks, r0, r1, ldl, shift);
        py::gil_scoped_release release;
        ssse::cuda::dual_cholesky(ptr<double>(l), ptr<const int64_t>(table_host),
                                  ptr<const int64_t>(table_dev), num_blocks, r0, r1, ldl, shift,
                                  strip_solved, ptr<int64_t>(info), ptr<void>(work), work_bytes,
                                  stream_of(stream));
      },
      py::arg("l"), py::arg("table_host"), py::arg("table_dev"), py::arg("num_blocks"),
      py::arg("r0"), py::arg("r1"), py::arg("ldl"), py::arg("shift"), py::arg("strip_solved"),
      py::arg("info"), py::arg("work"), py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "dual_apply_workspace_bytes",
      [](int64_t num_blocks, int64_t rows, int64_t r) {
        ssse::check_arg(num_blocks >= 0 && rows >= 0 && r >= 0,
                        "num_blocks, rows and r must be >= 0, got " +
                            std::to_string(num_blocks) + ", " + std::to_string(rows) + ", " +
                            std::to_string(r));
        return ssse::cuda::dual_apply_workspace_bytes(num_blocks, rows, r);
      },
      py::arg("num_blocks"), py::arg("rows"), py::arg("r"));

  m.def(
      "dual_apply_cuda",
      [=](int dtype, std::uintptr_t g, std::uintptr_t l, std::uintptr_t table_host,
          std::uintptr_t table_dev, int64_t num_blocks, int64_t rows, int64_t ldl,
          double damping, std::uintptr_t v, int64_t d, int64_t r, std::uintptr_t base,
          double scale, std::uintptr_t out, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_tables(num_blocks, table_host, table_dev);
        check_dual_apply(num_blocks, rows, ldl, damping, d, r, scale);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::dual_apply<T>(ptr<const T>(g), ptr<const double>(l),
                                    ptr<const int64_t>(table_host), ptr<const int64_t>(table_dev),
                                    num_blocks, rows, ldl, damping, ptr<const T>(v), d, r,
                                    ptr<const T>(base), scale, ptr<T>(out), ptr<void>(work),
                                    work_bytes, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("g"), py::arg("l"), py::arg("table_host"), py::arg("table_dev"),
      py::arg("num_blocks"), py::arg("rows"), py::arg("ldl"), py::arg("damping"), py::arg("v"),
      py::arg("d"), py::arg("r"), py::arg("base"), py::arg("scale"), py::arg("out"),
      py::arg("work"), py::arg("work_bytes"), py::arg("stream"));

  m.def(
      "dual_remove_rows_workspace_bytes",
      [](int64_t num_blocks, int64_t rows, int64_t k, int64_t first) {
        check_dual_remove(num_blocks, rows, rows, k, first);
        return ssse::cuda::dual_remove_rows_workspace_bytes(num_blocks, rows, k, first);
      },
      py::arg("num_blocks"), py::arg("rows"), py::arg("k"), py::arg("first"));

  m.def(
      "dual_remove_rows_cuda",
      [=](int dtype, std::uintptr_t g, std::uintptr_t l, std::uintptr_t table_host,
          std::uintptr_t table_dev, int64_t num_blocks, int64_t rows, int64_t ldl,
          std::uintptr_t keep, std::uintptr_t removed, int64_t k, int64_t first,
          std::uintptr_t info, std::uintptr_t work, std::size_t work_bytes,
          std::uintptr_t stream) {
        check_tables(num_blocks, table_host, table_dev);
        check_dual_remove(num_blocks, rows, ldl, k, first);
        py::gil_scoped_release release;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          ssse::cuda::dual_remove_rows<T>(ptr<T>(g), ptr<double>(l),
                                          ptr<const int64_t>(table_host),
                                          ptr<const int64_t>(table_dev), num_blocks, rows, ldl,
                                          ptr<const int64_t>(keep), ptr<const int64_t>(removed),
                                          k, first, ptr<int64_t>(info), ptr<void>(work),
                                          work_bytes, stream_of(stream));
        });
      },
      py::arg("dtype"), py::arg("g"), py::arg("l"), py::arg("table_host"), py::arg("table_dev"),
      py::arg("num_blocks"), py::arg("rows"), py::arg("ldl"), py::arg("keep"),
      py::arg("removed"), py::arg("k"), py::arg("first"), py::arg("info"), py::arg("work"),
      py::arg("work_bytes"), py::arg("stream"));
#endif
}
