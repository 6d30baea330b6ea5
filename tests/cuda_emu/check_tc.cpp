// Checks the tensor-core ("tc") CUDA kernels of csrc/cuda under the emulator (emu.cpp) against
// plain float64 loops: Gram accumulation, blocked inverse, Woodbury update, apply. Inputs are fresh
// random values; layouts include partial tiles, a last block smaller than B, blocks of 1..5, groups
// of small blocks, shuffled tables and sub-ranges of a table (offsets indexing the full buffers).
// Device buffers are host buffers that end at a guard page, so that a read or write past the end
// faults. Outputs are poisoned with NaN before each call.
//
//   tests/cuda_emu/run.sh [filter]      (builds with g++ and runs; see run.sh)
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/apply.h"
#include "cpu/sherman_morrison.h"
#include "cuda/apply.cuh"
#include "cuda/gram.cuh"
#include "cuda/plan.cuh"
#include "cuda/sherman_morrison.cuh"
#include "emu.h"

namespace {

int g_failures = 0;
int g_checks = 0;
std::mt19937_64 g_rng(12345);

// ---- guarded device buffers -------------------------------------------------------------------
template <typename T>
class Buffer {
 public:
  explicit Buffer(size_t n) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    mapped_ = (bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<unsigned char*>(p);
    unsigned char* guard = base_ + mapped_ - page;
    mprotect(guard, page, PROT_NONE);
    // End at the guard page (to 16 bytes: the start stays 16-byte aligned).
    data_ = reinterpret_cast<T*>(guard - (n * sizeof(T) + 15) / 16 * 16);
  }
  ~Buffer() { munmap(base_, mapped_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  void fill(T v) { std::fill(data_, data_ + n_, v); }

 private:
  size_t n_, mapped_;
  unsigned char* base_;
  T* data_;
};

double randn() {
  static std::normal_distribution<double> dist(0.0, 1.0);
  return dist(g_rng);
}

// ---- layouts ----------------------------------------------------------------------------------
struct Layout {
  std::vector<int64_t> table;  // [nb, 3]
  int64_t d = 0;
  int64_t numel = 0;
  int64_t nb() const { return static_cast<int64_t>(table.size() / 3); }
  int64_t start(int64_t b) const { return table[3 * b]; }
  int64_t size(int64_t b) const { return table[3 * b + 1]; }
  int64_t offset(int64_t b) const { return table[3 * b + 2]; }
};

Layout from_sizes(const std::vector<int64_t>& sizes) {
  Layout l;
  for (int64_t s : sizes) {
    l.table.push_back(l.d);
    l.table.push_back(s);
    l.table.push_back(l.numel);
    l.d += s;
    l.numel += s * s;
  }
  return l;
}

Layout fixed(int64_t d, int64_t block) {
  std::vector<int64_t> sizes;
  for (int64_t s = 0; s < d; s += block) sizes.push_back(std::min(block, d - s));
  return from_sizes(sizes);
}

// The table rows [b0, b1) of l (their starts and offsets still index the full buffers).
Layout sub_range(const Layout& l, int64_t b0, int64_t b1) {
  Layout r = l;
  r.table.assign(l.table.begin() + 3 * b0, l.table.begin() + 3 * b1);
  return r;
}

Layout shuffled(const Layout& l) {
  std::vector<int64_t> idx(static_cast<size_t>(l.nb()));
  std::iota(idx.begin(), idx.end(), 0);
  std::shuffle(idx.begin(), idx.end(), g_rng);
  Layout r = l;
  r.table.clear();
  for (int64_t b : idx)
    for (int k = 0; k < 3; ++k) r.table.push_back(l.table[static_cast<size_t>(3 * b + k)]);
  return r;
}

struct Named {
  std::string name;
  Layout layout;
};

std::vector<Named> layouts() {
  std::vector<Named> out;
  out.push_back({"fixed-130-of-300", fixed(300, 130)});
  out.push_back({"one-block-70", fixed(70, 70)});
  out.push_back({"mixed", from_sizes({5, 64, 65, 129, 1})});
  out.push_back({"one-block-300", fixed(300, 300)});
  std::vector<int64_t> small;
  for (int i = 0; i < 150; ++i) small.push_back(1 + i % 5);
  out.push_back({"150-blocks-of-1..5", from_sizes(small)});
  out.push_back({"small-big-small", from_sizes({3, 64, 40, 200, 64, 64, 7, 129})});
  Layout m = from_sizes({5, 64, 65, 129, 1, 33, 260});
  out.push_back({"sub-range-2..6", sub_range(m, 2, 6)});
  out.push_back({"shuffled", shuffled(from_sizes({3, 64, 40, 200, 64, 64, 7, 129, 5, 5}))});
  return out;
}

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = got[i] - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
  }
  return std::sqrt(num) / (den > 0 ? std::sqrt(den) : 1.0);
}

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "float32" : "float64";
}

// ---- Gram ---------------------------------------------------------------------------------------
// misalign: shift the gradient base by one element (no 16-byte vector path).
template <typename T>
void check_gram(const Named& nl, int64_t m, bool misalign, int64_t d_pad) {
  const Layout& l = nl.layout;
  const int64_t d = l.d + d_pad;  // extra columns no block covers
  Buffer<T> x(static_cast<size_t>(m * d + (misalign ? 1 : 0)));
  T* xs = x.data() + (misalign ? 1 : 0);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(randn());
  int64_t numel = 0;
  for (int64_t b = 0; b < l.nb(); ++b) numel = std::max(numel, l.offset(b) + l.size(b) * l.size(b));
  numel = std::max(numel, l.numel);
  Buffer<double> gram(static_cast<size_t>(numel));
  for (size_t i = 0; i < gram.size(); ++i) gram[i] = randn();
  std::vector<double> before(gram.data(), gram.data() + gram.size());
  Buffer<int64_t> layout_dev(l.table.size());
  std::copy(l.table.begin(), l.table.end(), layout_dev.data());
  const size_t wb = ssse::cuda::tc::gram_accumulate_workspace_bytes(l.table.data(), l.nb());
  Buffer<unsigned char> work(wb);
  work.fill(0xAB);
  ssse::cuda::tc::gram_accumulate<T>(xs, m, d, l.table.data(), layout_dev.data(), l.nb(),
                                     gram.data(), work.data(), wb, true, nullptr);
  // Expected: lower triangles += X_b^T X_b; everything else unchanged.
  std::vector<double> expect = before;
  for (int64_t b = 0; b < l.nb(); ++b) {
    const int64_t s = l.size(b), st = l.start(b), off = l.offset(b);
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        long double acc = 0;
        for (int64_t k = 0; k < m; ++k)
          acc += static_cast<long double>(xs[k * d + st + i]) * xs[k * d + st + j];
        expect[static_cast<size_t>(off + i * s + j)] += static_cast<double>(acc);
      }
  }
  std::vector<double> got(gram.data(), gram.data() + gram.size());
  const double err = rel_err(got, expect);
  bool untouched = true;
  for (size_t i = 0; i < got.size(); ++i)
    if (expect[i] == before[i] && got[i] != before[i]) untouched = false;
  char buf[256];
  std::snprintf(buf, sizeof buf, "gram %s %s m=%ld misalign=%d pad=%ld: err %.2e", nl.name.c_str(),
                type_name<T>(), static_cast<long>(m), misalign, static_cast<long>(d_pad), err);
  check(err <= 1e-13, buf);
  check(untouched, std::string(buf) + " (wrote outside the lower triangles)");
}

// ---- inverse -----------------------------------------------------------------------------------
// Cholesky of the s x s matrix f (full, row-major) in place; returns 0 or potrf's 1-based pivot.
int cholesky(std::vector<double>& f, int64_t s) {
  for (int64_t j = 0; j < s; ++j) {
    double djj = f[static_cast<size_t>(j * s + j)];
    for (int64_t p = 0; p < j; ++p) djj -= f[static_cast<size_t>(j * s + p)] * f[static_cast<size_t>(j * s + p)];
    if (!(djj > 0.0)) return static_cast<int>(j + 1);
    djj = std::sqrt(djj);
    f[static_cast<size_t>(j * s + j)] = djj;
    for (int64_t i = j + 1; i < s; ++i) {
      double v = f[static_cast<size_t>(i * s + j)];
      for (int64_t p = 0; p < j; ++p) v -= f[static_cast<size_t>(i * s + p)] * f[static_cast<size_t>(j * s + p)];
      f[static_cast<size_t>(i * s + j)] = v / djj;
    }
  }
  return 0;
}

// (L L^T)^{-1} from the factor in the lower triangle of f.
std::vector<double> chol_inverse(const std::vector<double>& f, int64_t s) {
  std::vector<double> linv(static_cast<size_t>(s * s), 0.0), out(static_cast<size_t>(s * s), 0.0);
  for (int64_t j = 0; j < s; ++j)
    for (int64_t i = j; i < s; ++i) {
      double acc = i == j ? 1.0 : 0.0;
      for (int64_t p = j; p < i; ++p) acc -= f[static_cast<size_t>(i * s + p)] * linv[static_cast<size_t>(p * s + j)];
      linv[static_cast<size_t>(i * s + j)] = acc / f[static_cast<size_t>(i * s + i)];
    }
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < s; ++j) {
      double acc = 0.0;
      for (int64_t q = std::max(i, j); q < s; ++q) acc += linv[static_cast<size_t>(q * s + i)] * linv[static_cast<size_t>(q * s + j)];
      out[static_cast<size_t>(i * s + j)] = acc;
    }
  return out;
}

int64_t storage_numel(const Layout& l) {
  int64_t numel = l.numel;
  for (int64_t b = 0; b < l.nb(); ++b) numel = std::max(numel, l.offset(b) + l.size(b) * l.size(b));
  return numel;
}

// Random SPD blocks (gram = X_b^T X_b from m rows), optionally one block made indefinite at
// diagonal index `bad_index` of table row `bad_block`.
template <typename T>
void check_inverse(const Named& nl, int64_t m, int64_t bad_block, int64_t bad_index) {
  const Layout& l = nl.layout;
  const int64_t numel = storage_numel(l);
  Buffer<double> gram(static_cast<size_t>(numel));
  for (size_t i = 0; i < gram.size(); ++i) gram[i] = std::numeric_limits<double>::quiet_NaN();
  const double damping = 0.3, normalizer = static_cast<double>(m);
  std::vector<std::vector<double>> expect(static_cast<size_t>(l.nb()));
  std::vector<int64_t> expect_info(static_cast<size_t>(l.nb()), 0);
  for (int64_t b = 0; b < l.nb(); ++b) {
    const int64_t s = l.size(b), off = l.offset(b);
    std::vector<double> x(static_cast<size_t>(m * s));
    for (double& v : x) v = randn();
    std::vector<double> f(static_cast<size_t>(s * s));
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < m; ++k) acc += x[static_cast<size_t>(k * s + i)] * x[static_cast<size_t>(k * s + j)];
        if (b == bad_block && i == j && i == bad_index) acc = -5.0 * normalizer;
        if (j <= i) gram[static_cast<size_t>(off + i * s + j)] = acc;  // lower triangle only
        f[static_cast<size_t>(i * s + j)] = acc / normalizer + (i == j ? damping : 0.0);
      }
    expect_info[static_cast<size_t>(b)] = cholesky(f, s);
    if (expect_info[static_cast<size_t>(b)] == 0) expect[static_cast<size_t>(b)] = chol_inverse(f, s);
  }
  Buffer<T> out(static_cast<size_t>(numel));
  out.fill(static_cast<T>(-7.0));  // poison: must stay on failed blocks and outside the table
  Buffer<int64_t> info(static_cast<size_t>(l.nb()));
  info.fill(-3);
  Buffer<int64_t> layout_dev(l.table.size());
  std::copy(l.table.begin(), l.table.end(), layout_dev.data());
  const size_t wb = ssse::cuda::tc::inverse_from_gram_workspace_bytes(l.table.data(), l.nb());
  Buffer<unsigned char> work(wb);
  work.fill(0xCD);
  ssse::cuda::tc::inverse_from_gram<T>(gram.data(), l.table.data(), layout_dev.data(), l.nb(),
                                       damping, normalizer, out.data(), info.data(), work.data(),
                                       wb, nullptr);
  std::vector<double> got_all, ref_all;
  bool info_ok = true, untouched = true;
  std::vector<char> in_block(static_cast<size_t>(numel), 0);
  for (int64_t b = 0; b < l.nb(); ++b) {
    const int64_t s = l.size(b), off = l.offset(b);
    if (info[static_cast<size_t>(b)] != expect_info[static_cast<size_t>(b)]) info_ok = false;
    for (int64_t e = 0; e < s * s; ++e) {
      in_block[static_cast<size_t>(off + e)] = 1;
      const double v = static_cast<double>(out[static_cast<size_t>(off + e)]);
      if (expect_info[static_cast<size_t>(b)] != 0) {
        if (v != -7.0) untouched = false;
      } else {
        got_all.push_back(v);
        ref_all.push_back(expect[static_cast<size_t>(b)][static_cast<size_t>(e)]);
      }
    }
  }
  for (int64_t e = 0; e < numel; ++e)
    if (!in_block[static_cast<size_t>(e)] && static_cast<double>(out[static_cast<size_t>(e)]) != -7.0) untouched = false;
  const double err = rel_err(got_all, ref_all);
  const double tol = sizeof(T) == 4 ? 2e-7 : 1e-12;
  char buf[256];
  std::snprintf(buf, sizeof buf, "inverse %s %s m=%ld bad=%ld@%ld: err %.2e", nl.name.c_str(),
                type_name<T>(), static_cast<long>(m), static_cast<long>(bad_block),
                static_cast<long>(bad_index), err);
  check(err <= tol, buf);
  check(info_ok, std::string(buf) + " (info differs from potrf's)");
  check(untouched, std::string(buf) + " (wrote a failed block or outside the table)");
}

// ---- Woodbury update ------------------------------------------------------------------------------
// Packed block inverses (lambda I + X_b^T X_b / N)^{-1} in double, X of `rows` fresh rows; with
// `extra` (m x d, row-major), those rows are added to the Fisher too.
std::vector<double> make_inverse(const Layout& l, int64_t rows, double damping, double normalizer,
                                 const std::vector<double>* extra, int64_t m, int64_t numel) {
  std::vector<double> inv(static_cast<size_t>(numel), 0.0);
  for (int64_t b = 0; b < l.nb(); ++b) {
    const int64_t s = l.size(b), st = l.start(b), off = l.offset(b);
    std::vector<double> x(static_cast<size_t>(rows * s));
    for (double& v : x) v = 0.5 * randn();
    std::vector<double> f(static_cast<size_t>(s * s));
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < rows; ++k) acc += x[static_cast<size_t>(k * s + i)] * x[static_cast<size_t>(k * s + j)];
        if (extra)
          for (int64_t k = 0; k < m; ++k)
            acc += (*extra)[static_cast<size_t>(k * l.d + st + i)] * (*extra)[static_cast<size_t>(k * l.d + st + j)];
        f[static_cast<size_t>(i * s + j)] = acc / normalizer + (i == j ? damping : 0.0);
      }
    if (cholesky(f, s) != 0) std::abort();
    const std::vector<double> fi = chol_inverse(f, s);
    std::copy(fi.begin(), fi.end(), inv.begin() + off);
  }
  return inv;
}

template <typename T>
void check_woodbury(const Named& nl, int64_t m, int sign, double grad_scale) {
  const Layout& l = nl.layout;
  const int64_t numel = storage_numel(l), d = l.d;
  const double damping = 0.5, normalizer = 200.0;
  std::vector<double> g(static_cast<size_t>(m * d));
  for (double& v : g) v = grad_scale * 0.5 * randn();
  // Downdates remove rows that the inverse contains (unless grad_scale makes them foreign).
  std::vector<double> inv0 = make_inverse(l, 60, damping, normalizer,
                                          sign < 0 && grad_scale <= 1.0 ? &g : nullptr, m, numel);
  Buffer<T> inv(static_cast<size_t>(numel)), grads(static_cast<size_t>(m * d));
  for (int64_t e = 0; e < numel; ++e) inv[static_cast<size_t>(e)] = static_cast<T>(inv0[static_cast<size_t>(e)]);
  for (int64_t e = 0; e < m * d; ++e) grads[static_cast<size_t>(e)] = static_cast<T>(g[static_cast<size_t>(e)]);
  // Entries outside the table's blocks must stay as they are.
  std::vector<char> in_block(static_cast<size_t>(numel), 0);
  for (int64_t b = 0; b < l.nb(); ++b)
    for (int64_t e = 0; e < l.size(b) * l.size(b); ++e) in_block[static_cast<size_t>(l.offset(b) + e)] = 1;
  for (int64_t e = 0; e < numel; ++e)
    if (!in_block[static_cast<size_t>(e)]) inv[static_cast<size_t>(e)] = static_cast<T>(-9.0);
  // Reference: the CPU kernel in double on the same (rounded) inputs.
  std::vector<double> ref(static_cast<size_t>(numel)), gref(static_cast<size_t>(m * d));
  for (int64_t e = 0; e < numel; ++e) ref[static_cast<size_t>(e)] = static_cast<double>(inv[static_cast<size_t>(e)]);
  for (int64_t e = 0; e < m * d; ++e) gref[static_cast<size_t>(e)] = static_cast<double>(grads[static_cast<size_t>(e)]);
  std::vector<int64_t> ref_info(static_cast<size_t>(l.nb()));
  ssse::cpu::sherman_morrison_chunk<double>(ref.data(), l.table.data(), l.nb(), gref.data(), m, d,
                                            normalizer, sign, ref_info.data(), 1);

  Buffer<int64_t> layout_dev(l.table.size()), info(static_cast<size_t>(l.nb()));
  std::copy(l.table.begin(), l.table.end(), layout_dev.data());
  info.fill(-3);
  const size_t wb = ssse::cuda::tc::sherman_morrison_chunk_workspace_bytes(l.table.data(), l.nb());
  Buffer<unsigned char> work(wb);
  work.fill(0xEE);
  ssse::cuda::tc::sherman_morrison_chunk<T>(inv.data(), l.table.data(), layout_dev.data(), l.nb(),
                                            grads.data(), m, d, normalizer, sign, info.data(),
                                            work.data(), wb, nullptr);
  bool info_ok = true, symmetric = true, untouched = true;
  std::vector<double> got_all, ref_all;
  for (int64_t b = 0; b < l.nb(); ++b) {
    if (info[static_cast<size_t>(b)] != ref_info[static_cast<size_t>(b)]) info_ok = false;
    if (ref_info[static_cast<size_t>(b)] != 0) continue;
    const int64_t s = l.size(b), off = l.offset(b);
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        const T v = inv[static_cast<size_t>(off + i * s + j)];
        if (v != inv[static_cast<size_t>(off + j * s + i)]) symmetric = false;
        got_all.push_back(static_cast<double>(v));
        ref_all.push_back(ref[static_cast<size_t>(off + i * s + j)]);
      }
  }
  for (int64_t e = 0; e < numel; ++e)
    if (!in_block[static_cast<size_t>(e)] && static_cast<double>(inv[static_cast<size_t>(e)]) != -9.0) untouched = false;
  const double err = rel_err(got_all, ref_all);
  // float32: the blocks are rounded to float32 once per 64-row sub-chunk.
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-12;
  char buf[256];
  std::snprintf(buf, sizeof buf, "woodbury %s %s m=%ld sign=%d scale=%g: err %.2e", nl.name.c_str(),
                type_name<T>(), static_cast<long>(m), sign, grad_scale, err);
  check(got_all.empty() || err <= tol, buf);
  check(info_ok, std::string(buf) + " (info differs from the CPU kernel's)");
  check(symmetric, std::string(buf) + " (not bitwise symmetric)");
  check(untouched, std::string(buf) + " (wrote outside the table's blocks)");
}

// ---- apply -----------------------------------------------------------------------------------------
// base_mode: 0 none, 1 separate, 2 aliasing out. misalign shifts v by one element.
template <typename T>
void check_apply(const Named& nl, int64_t r, int base_mode, bool misalign) {
  const Layout& l = nl.layout;
  const int64_t numel = storage_numel(l), d = l.d;
  Buffer<T> inv(static_cast<size_t>(numel)), v(static_cast<size_t>(d * r + 1));
  Buffer<T> out(static_cast<size_t>(d * r)), base(static_cast<size_t>(d * r));
  for (size_t e = 0; e < inv.size(); ++e) inv[e] = static_cast<T>(randn());
  T* vs = v.data() + (misalign ? 1 : 0);
  for (int64_t e = 0; e < d * r; ++e) vs[e] = static_cast<T>(randn());
  for (size_t e = 0; e < base.size(); ++e) base[e] = static_cast<T>(randn());
  out.fill(std::numeric_limits<T>::quiet_NaN());
  if (base_mode == 2) std::copy(base.data(), base.data() + base.size(), out.data());
  // Reference: the CPU kernel in double on the same inputs.
  std::vector<double> inv_d(inv.data(), inv.data() + inv.size()), v_d(vs, vs + d * r);
  std::vector<double> base_d(base.data(), base.data() + base.size()), ref(static_cast<size_t>(d * r));
  const double scale = -0.7;
  ssse::cpu::apply_inverse<double>(inv_d.data(), l.table.data(), l.nb(), v_d.data(), d, r,
                                   base_mode ? base_d.data() : nullptr, scale, ref.data(), 1);
  Buffer<int64_t> layout_dev(l.table.size());
  std::copy(l.table.begin(), l.table.end(), layout_dev.data());
  const size_t wb = ssse::cuda::tc::apply_inverse_workspace_bytes(l.table.data(), l.nb());
  Buffer<unsigned char> work(wb);
  const T* bp = base_mode == 0 ? nullptr : base_mode == 1 ? base.data() : out.data();
  ssse::cuda::tc::apply_inverse<T>(inv.data(), l.table.data(), layout_dev.data(), l.nb(), vs, d, r,
                                   bp, scale, out.data(), work.data(), wb, nullptr);
  // Rows that no block of the table covers keep their value (NaN, or base when aliased).
  std::vector<char> covered(static_cast<size_t>(d), 0);
  for (int64_t b = 0; b < l.nb(); ++b)
    for (int64_t i = 0; i < l.size(b); ++i) covered[static_cast<size_t>(l.start(b) + i)] = 1;
  std::vector<double> got_all, ref_all;
  bool untouched = true;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t c = 0; c < r; ++c) {
      const size_t e = static_cast<size_t>(i * r + c);
      if (covered[static_cast<size_t>(i)]) {
        got_all.push_back(static_cast<double>(out[e]));
        ref_all.push_back(ref[e]);
      } else if (base_mode == 2 ? out[e] != base[e] : !std::isnan(static_cast<double>(out[e]))) {
        untouched = false;
      }
    }
  const double err = rel_err(got_all, ref_all);
  const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
  char buf[256];
  std::snprintf(buf, sizeof buf, "apply %s %s r=%ld base=%d misalign=%d (ws %zu): err %.2e",
                nl.name.c_str(), type_name<T>(), static_cast<long>(r), base_mode, misalign, wb, err);
  check(err <= tol, buf);
  check(untouched, std::string(buf) + " (wrote rows outside the table)");
}

// ---- work plans ----------------------------------------------------------------------------------
// The plan of a table with many distinct classes (more than one ClassTable and one RankTable per
// launch): order[] holds every block with work, sorted by key descending; the launch tables cover
// every (block, item) exactly once, with the global numbering and the prefix property.
void check_plan(ssse::cuda::tc::Keying keying, const std::vector<int64_t>& sizes) {
  using namespace ssse::cuda::tc;
  const Layout l = from_sizes(sizes);  // only the table is used: no matrices
  const Plan plan(l.table.data(), l.nb(), keying);
  Buffer<int64_t> layout_dev(l.table.size());
  std::copy(l.table.begin(), l.table.end(), layout_dev.data());
  Buffer<unsigned char> work(plan.workspace_bytes());
  work.fill(0x5A);
  const int64_t* order = plan.build(layout_dev.data(), l.nb(), work.data(), work.size(), nullptr);
  bool ok = true;
  std::vector<int> seen(static_cast<size_t>(l.nb()), 0);
  int prev = 1 << 30;
  for (int64_t r = 0; r < plan.ranked(); ++r) {
    const int64_t b = order[r];
    if (b < 0 || b >= l.nb()) { ok = false; break; }
    ++seen[static_cast<size_t>(b)];
    const int key = block_key(l.table.data(), b, keying);
    if (key < 0 || key > prev) ok = false;
    prev = key;
  }
  for (int64_t b = 0; b < l.nb(); ++b)
    if (seen[static_cast<size_t>(b)] != (block_key(l.table.data(), b, keying) >= 0 ? 1 : 0)) ok = false;
  // Items: key + 1 per block, numbered across launches.
  auto items = [](int key) -> int64_t { return key + 1; };
  std::vector<std::vector<int>> hit(static_cast<size_t>(l.nb()));
  std::vector<char> slot_hit;
  int launches = 0;
  for (const auto& [table, n] : plan.tables(items, [](int) { return true; })) {
    ++launches;
    for (int64_t q = 0; q < n; ++q) {
      const WorkItem w = find_work(table, order, q);
      auto& h = hit[static_cast<size_t>(w.block)];
      if (h.empty()) h.assign(static_cast<size_t>(w.tiles + 1), 0);
      if (w.index < 0 || w.index > w.tiles || w.tiles != block_key(l.table.data(), w.block, keying)) ok = false;
      else ++h[static_cast<size_t>(w.index)];
      if (static_cast<size_t>(w.slot) >= slot_hit.size()) slot_hit.resize(static_cast<size_t>(w.slot) + 1, 0);
      ++slot_hit[static_cast<size_t>(w.slot)];
    }
  }
  for (int64_t b = 0; b < l.nb(); ++b) {
    const int key = block_key(l.table.data(), b, keying);
    if (key < 0) continue;
    const auto& h = hit[static_cast<size_t>(b)];
    if (h.size() != static_cast<size_t>(key + 1)) { ok = false; continue; }
    for (int c : h) if (c != 1) ok = false;
  }
  for (char c : slot_hit) if (c != 1) ok = false;
  // Active blocks at step K are a prefix of order.
  for (int K = 0; K < plan.max_key(); K += 7) {
    const int64_t n = plan.count([K](int t) { return t > K; });
    for (int64_t r = 0; r < plan.ranked(); ++r)
      if ((block_key(l.table.data(), order[r], keying) > K) != (r < n)) ok = false;
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "plan keying=%d: %ld blocks, %zu classes, %d launches",
                static_cast<int>(keying), static_cast<long>(l.nb()), plan.classes().size(), launches);
  check(ok && launches > 1, buf);
}

// ---- driver -------------------------------------------------------------------------------------
bool selected(const std::string& name, const std::string& filter) {
  return filter.empty() || name.find(filter) != std::string::npos;
}

}  // namespace

// A representative subset (a few seconds of emulation per kernel): the test suite's run.
void quick() {
  const std::vector<Named> ls = layouts();
  {
    std::vector<int64_t> sizes;
    for (int k = 1; k <= 150; ++k) {
      sizes.push_back(64 * k - (k % 7));
      sizes.push_back(1 + k % 5);
    }
    check_plan(ssse::cuda::tc::Keying::kSweep, sizes);
    check_plan(ssse::cuda::tc::Keying::kGram, sizes);
  }
  check_gram<float>(ls[2], 37, false, 0);             // mixed: small-block group, partial tiles
  check_gram<double>(ls[7], 20, true, 1);             // shuffled table, misaligned, 8-byte copies
  check_gram<double>(ls[4], 16, false, 0);            // 150 blocks of 1..5
  check_inverse<double>(ls[0], 97, 1, 69);            // 130-blocks, indefinite second pivot tile
  check_inverse<float>(ls[6], 60, -1, -1);            // sub-range of a table
  check_woodbury<double>(ls[0], 150, +1, 1.0);        // three sub-chunks
  check_woodbury<float>(ls[2], 40, -1, 20.0);         // failing downdate: info like the CPU's
  setenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP", "400000", 1);
  check_woodbury<double>(ls[5], 30, -1, 1.0);         // groups of blocks
  unsetenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP");
  std::vector<int64_t> sizes = {300};
  for (int i = 0; i < 40; ++i) sizes.push_back(1 + i % 7);
  check_apply<float>(Named{"one-big-many-small", from_sizes(sizes)}, 1, 2, false);  // planned
  check_apply<double>(Named{"fixed-256-of-1024", fixed(1024, 256)}, 1, 1, false);   // vectors
  check_apply<float>(ls[2], 3, 1, true);
}

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  if (filter == "quick") {
    quick();
    const emu::Stats st = emu::stats();
    std::printf("%d passed, %d failed (%ld launches, %ld blocks emulated)\n",
                g_checks - g_failures, g_failures, st.launches, st.blocks);
    return g_failures == 0 ? 0 : 1;
  }
  if (selected("plan", filter)) {
    // Sizes with 300 distinct tile counts (keys beyond one RankTable) and small blocks between.
    std::vector<int64_t> sizes;
    for (int k = 1; k <= 300; ++k) {
      sizes.push_back(64 * k - (k % 7));
      sizes.push_back(1 + k % 5);
      sizes.push_back(2 + k % 3);
    }
    check_plan(ssse::cuda::tc::Keying::kSweep, sizes);
    check_plan(ssse::cuda::tc::Keying::kGram, sizes);
    check_plan(ssse::cuda::tc::Keying::kApply, sizes);
    std::printf("plan: done\n");
  }
  if (selected("gram", filter)) {
    for (const Named& nl : layouts()) {
      check_gram<float>(nl, 37, false, 0);
      check_gram<double>(nl, 37, false, 0);
    }
    const std::vector<Named> ls = layouts();
    check_gram<float>(ls[2], 1, true, 3);
    check_gram<double>(ls[2], 50, true, 1);
    check_gram<double>(ls[4], 16, false, 2);
    check_gram<float>(ls[5], 33, true, 0);
    check_gram<double>(ls[6], 5, false, 0);
    std::printf("gram: done\n");
  }
  if (selected("inverse", filter)) {
    for (const Named& nl : layouts()) {
      check_inverse<float>(nl, 97, -1, -1);
      check_inverse<double>(nl, 97, -1, -1);
    }
    const std::vector<Named> ls = layouts();
    // Indefinite blocks: second pivot tile (index 69 of 130), first tile, a small block.
    check_inverse<double>(ls[0], 150, 1, 69);
    check_inverse<float>(ls[0], 150, 0, 3);
    check_inverse<double>(ls[2], 40, 3, 128);
    check_inverse<double>(ls[4], 40, 7, 0);
    check_inverse<double>(Named{"fixed-200-of-100", fixed(200, 100)}, 130, 1, 69);
    // Fewer rows than the block size: rank-deficient gram, the damping keeps F positive definite.
    check_inverse<double>(ls[3], 20, -1, -1);
    std::printf("inverse: done\n");
  }
  if (selected("woodbury", filter)) {
    for (const Named& nl : layouts()) {
      check_woodbury<float>(nl, 70, +1, 1.0);
      check_woodbury<double>(nl, 70, +1, 1.0);
    }
    const std::vector<Named> ls = layouts();
    check_woodbury<double>(ls[0], 150, +1, 1.0);   // three sub-chunks (64, 64, 22)
    check_woodbury<float>(ls[2], 1, +1, 1.0);
    check_woodbury<double>(ls[2], 64, -1, 1.0);    // downdate of rows that were added
    check_woodbury<float>(ls[5], 100, -1, 1.0);
    check_woodbury<double>(ls[2], 80, -1, 20.0);   // rows never added: info, blocks kept
    check_woodbury<float>(ls[7], 30, -1, 20.0);
    // Groups of blocks: a tiny workspace cap processes the table in several groups.
    setenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP", "400000", 1);
    check_woodbury<double>(ls[5], 70, +1, 1.0);
    check_woodbury<float>(ls[4], 20, +1, 1.0);
    check_woodbury<double>(ls[6], 90, -1, 20.0);
    unsetenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP");
    std::printf("woodbury: done\n");
  }
  if (selected("apply", filter)) {
    std::vector<Named> ls = layouts();
    std::vector<int64_t> sizes = {300};
    for (int i = 0; i < 40; ++i) sizes.push_back(1 + i % 7);
    ls.push_back({"one-big-many-small", from_sizes(sizes)});  // planned grid
    ls.push_back({"fixed-256-of-1024", fixed(1024, 256)});     // vector path
    std::vector<int64_t> many;
    for (int k = 1; k <= 40; ++k) many.push_back(16 * k - k % 3);
    for (int k = 0; k < 100; ++k) many.push_back(1);
    ls.push_back({"40-classes-planned", from_sizes(many)});     // two ClassTables
    for (const Named& nl : ls) {
      check_apply<float>(nl, 1, 1, false);
      check_apply<double>(nl, 1, 2, false);
    }
    check_apply<float>(ls.back(), 1, 0, true);
    check_apply<double>(ls.back(), 1, 1, true);
    for (int64_t r : {3, 4, 9}) {
      check_apply<float>(ls[2], r, 1, false);
      check_apply<double>(ls[8], r, 2, false);
    }
    std::printf("apply: done\n");
  }
  const emu::Stats st = emu::stats();
  std::printf("%d checks, %d failures (%ld launches, %ld blocks emulated)\n", g_checks, g_failures,
              st.launches, st.blocks);
  return g_failures == 0 ? 0 : 1;
}
