// kernels/simd/matmul.hpp (y = x w^T) against the reference (RELIABILITY.md N1, N2), for the default
// architecture and the scalar fallback: the per-element gamma_{k+2} bound, NMSE, exact mode bitwise,
// strided operands and guard bands around the output.

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/matmul.hpp>
#include <moe/kernels/simd/matmul.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

namespace {

using moe::Index;
namespace kernels = moe::kernels;

/// A (rows, cols) matrix with row stride cols + pad, between two 1024-element guard bands; the guards
/// and the row gaps hold a NaN canary bit pattern.
template <class T>
class GuardedMatrix {
 public:
  static constexpr Index guard = 1024;
  GuardedMatrix(Index rows, Index cols, Index pad)
      : rows_(rows), cols_(cols), stride_(cols + pad), buf_(static_cast<std::size_t>(2 * guard + rows * (cols + pad)), canary()) {}
  moe::MatrixView<T> view() { return {buf_.data() + guard, rows_, cols_, stride_}; }
  T operator()(Index i, Index j) const { return buf_[static_cast<std::size_t>(guard + i * stride_ + j)]; }
  T& operator()(Index i, Index j) { return buf_[static_cast<std::size_t>(guard + i * stride_ + j)]; }
  /// True when every element outside the (rows, cols) block still holds the canary, bit for bit.
  bool outside_intact() const {
    const T c = canary();
    for (Index e = 0; e < static_cast<Index>(buf_.size()); ++e) {
      const Index off = e - guard;
      const bool inside = off >= 0 && off < rows_ * stride_ && off % stride_ < cols_;
      if (!inside && std::memcmp(&buf_[static_cast<std::size_t>(e)], &c, sizeof(T)) != 0) return false;
    }
    return true;
  }
  static T canary() {
    if constexpr (sizeof(T) == 4) return std::bit_cast<T>(std::uint32_t{0x7FA5A5A5u});
    else return std::bit_cast<T>(std::uint64_t{0x7FF5A5A5A5A5A5A5ull});
  }

 private:
  Index rows_, cols_, stride_;
  std::vector<T> buf_;
};

/// Fills a (rows, cols) guarded matrix: N(0, 1), or integers in [-range, range] in exact mode.
template <class T>
void fill(GuardedMatrix<T>& a, Index rows, Index cols, moe::test::Rng& rng, int exact_range) {
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) {
      a(i, j) = exact_range > 0 ? static_cast<T>(rng.below(2 * exact_range + 1) - exact_range) : static_cast<T>(rng.normal());
    }
  }
}

/// Runs the kernel on (m, k) x (n, k)^T with strided inputs and a guarded output and checks it.
/// exact: integer inputs x in [-4, 4], w in [-2, 2]; the result must equal the reference bit for bit.
template <class T, class Arch>
void check_matmul(Arch arch, moe::test::Rng& rng, Index m, Index n, Index k, bool exact) {
  INFO("m = " << m << ", n = " << n << ", k = " << k << ", T = " << (sizeof(T) == 4 ? "float" : "double")
              << (exact ? ", exact mode" : ""));
  GuardedMatrix<T> x(m, k, 1), w(n, k, 2), y(m, n, 3);
  fill(x, m, k, rng, exact ? 4 : 0);
  fill(w, n, k, rng, exact ? 2 : 0);
  kernels::matmul_nt(arch, moe::ConstMatrixView<T>(x.view()), moe::ConstMatrixView<T>(w.view()), y.view());
  CHECK(y.outside_intact());

  // Reference in double on the widened inputs, and the per-element magnitude sum_p |x_ip w_jp|.
  moe::RowMatrix<double> x64(m, k), w64(n, k), ref(m, n), magnitude(m, n);
  for (Index i = 0; i < m; ++i) {
    for (Index p = 0; p < k; ++p) x64(i, p) = x(i, p);
  }
  for (Index j = 0; j < n; ++j) {
    for (Index p = 0; p < k; ++p) w64(j, p) = w(j, p);
  }
  kernels::reference::matmul_nt<double>(x64, w64, ref);
  const moe::RowMatrix<double> x_abs = x64.cwiseAbs(), w_abs = w64.cwiseAbs();
  kernels::reference::matmul_nt<double>(x_abs, w_abs, magnitude);

  const double gamma = moe::test::gamma_n<T>(static_cast<double>(k + 2));
  Index bad = 0;
  std::vector<double> got(static_cast<std::size_t>(m * n));
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < n; ++j) {
      const T g = y(i, j);
      got[static_cast<std::size_t>(i * n + j)] = g;
      const bool ok = exact ? static_cast<double>(g) == ref(i, j)
                            : std::isfinite(g) && std::abs(g - ref(i, j)) <= gamma * magnitude(i, j);
      if (!ok && bad++ == 0) UNSCOPED_INFO("first bad (" << i << ", " << j << "): got " << g << ", ref " << ref(i, j));
    }
  }
  CHECK(bad == 0);
  if (!exact && m * n > 0 && k > 0) {
    const double err = moe::test::nmse(ref.data(), got.data(), got.size());
    INFO("NMSE " << err);
    CHECK(err <= (std::is_same_v<T, float> ? 1e-7 : 1e-20));
  }
}

constexpr Index k_mn[] = {0, 1, 3, 4, 5, 8, 17};
constexpr Index k_k[] = {0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33};

}  // namespace

TEMPLATE_TEST_CASE("matmul_nt f32 is within gamma_{k+2} of the reference on tile and lane edges",
                   "[kernel][matmul]", kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x3A7D0001);
  for (const Index m : k_mn) {
    for (const Index n : k_mn) {
      for (const Index k : k_k) check_matmul<float>(TestType{}, rng, m, n, k, false);
    }
  }
}

TEMPLATE_TEST_CASE("matmul_nt on larger shapes", "[kernel][matmul]", kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x3A7D0002);
  check_matmul<float>(TestType{}, rng, 65, 129, 1025, false);
  check_matmul<float>(TestType{}, rng, 17, 33, 1000, false);
  check_matmul<float>(TestType{}, rng, 1, 1025, 64, false);
  check_matmul<double>(TestType{}, rng, 33, 17, 1025, false);
  check_matmul<double>(TestType{}, rng, 5, 7, 17, false);
}

TEMPLATE_TEST_CASE("matmul_nt exact mode is bitwise equal to the reference", "[kernel][matmul]",
                   kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x3A7D0003);
  for (const Index m : {Index{1}, Index{4}, Index{5}, Index{17}}) {
    for (const Index n : {Index{3}, Index{4}, Index{9}}) {
      for (const Index k : {Index{1}, Index{15}, Index{16}, Index{17}, Index{33}, Index{1025}}) {
        check_matmul<float>(TestType{}, rng, m, n, k, true);
      }
    }
  }
  check_matmul<double>(TestType{}, rng, 9, 6, 1025, true);
}

TEMPLATE_TEST_CASE("matmul_nt with k == 0 writes zeros", "[kernel][matmul]", kernels::default_arch,
                   kernels::scalar) {
  GuardedMatrix<float> x(5, 0, 1), w(6, 0, 1), y(5, 6, 2);
  kernels::matmul_nt(TestType{}, moe::ConstMatrixView<float>(x.view()), moe::ConstMatrixView<float>(w.view()), y.view());
  for (Index i = 0; i < 5; ++i) {
    for (Index j = 0; j < 6; ++j) CHECK(y(i, j) == 0.0f);
  }
  CHECK(y.outside_intact());
}

#ifdef MOE_TEST_EXPECT_AVX2
TEST_CASE("the AVX2 test executable runs the fma3+avx2 kernels", "[kernel]") {
  CHECK(std::string(kernels::default_arch::name()) == "fma3+avx2");
}
#endif
