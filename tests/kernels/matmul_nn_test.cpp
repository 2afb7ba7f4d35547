// kernels/simd/matmul_nn.hpp (c += a b and c += aᵀ b, b row-major unpacked) against the double reference (RELIABILITY.md N1,
// N2): register-tile and column-tail edges, strided operands, accumulation onto c, exact mode bitwise, and
// the same bits on the SIMD and the scalar path; for the default architecture and the scalar fallback.

#include <cmath>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/matmul.hpp>
#include <moe/kernels/simd/matmul_nn.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

/// (rows, cols) values: N(0, 1), or integers in [-range, range] in exact mode.
template <class T>
RowMatrix<T> operand(moe::test::Rng& rng, Index rows, Index cols, int range) {
  RowMatrix<T> a(rows, cols);
  for (Index i = 0; i < a.size(); ++i)
    a.data()[i] = range > 0 ? static_cast<T>(rng.below(2 * range + 1) - range) : static_cast<T>(rng.normal());
  return a;
}

/// c0 + a b (or, transposed, c0 + aᵀ b with a stored (k, m)) through views with row gaps (a, b and c live in
/// wider matrices); checks every element within gamma_{k+3} of sum |terms| (bitwise in exact mode) and that
/// the gaps stay untouched.
template <class T, class Arch>
RowMatrix<T> check_nn(moe::test::Rng& rng, Index m, Index n, Index k, bool exact, bool transposed = false) {
  INFO("m = " << m << ", n = " << n << ", k = " << k << (exact ? ", exact" : "") << (transposed ? ", a transposed" : ""));
  const int range = exact ? 3 : 0;
  const Index a_rows = transposed ? k : m, a_cols = transposed ? m : k;
  const RowMatrix<T> a_wide = operand<T>(rng, a_rows, a_cols + 2, range), b_wide = operand<T>(rng, k, n + 3, range);
  RowMatrix<T> c_wide = operand<T>(rng, m, n + 1, range);
  const RowMatrix<T> c_start = c_wide;
  const moe::ConstMatrixView<T> a(a_wide.data(), a_rows, a_cols, a_cols + 2);
  const moe::ConstMatrixView<T> b(k > 0 ? b_wide.data() + 1 : b_wide.data(), k, n, n + 3);  // column 1 on
  const moe::MatrixView<T> c(c_wide.data(), m, n, n + 1);
  if (transposed) {
    kernels::add_matmul_tn(Arch{}, a, b, c);
  } else {
    kernels::add_matmul_nn(Arch{}, a, b, c);
  }

  RowMatrix<double> a64 = a_wide.leftCols(a_cols).template cast<double>();
  if (transposed) a64 = RowMatrix<double>(a64.transpose());
  const RowMatrix<double> b64 = b_wide.middleCols(1, n).template cast<double>();
  RowMatrix<double> ref = c_start.leftCols(n).template cast<double>();
  RowMatrix<double> mag = ref.cwiseAbs();
  const RowMatrix<double> a_abs = a64.cwiseAbs(), b_abs = b64.cwiseAbs();
  kernels::reference::add_matmul_nn<double>(a64, b64, ref);
  kernels::reference::add_matmul_nn<double>(a_abs, b_abs, mag);
  const double gamma = moe::test::gamma_n<T>(static_cast<double>(k + 3));
  Index bad = 0;
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < n; ++j) {
      const double got = static_cast<double>(c_wide(i, j));
      const bool ok = exact ? got == ref(i, j) : std::abs(got - ref(i, j)) <= gamma * mag(i, j);
      if (!ok && bad++ == 0) UNSCOPED_INFO("first bad (" << i << ", " << j << "): " << got << " vs " << ref(i, j));
    }
    CHECK(c_wide(i, n) == c_start(i, n));  // the row gap
  }
  CHECK(bad == 0);
  return c_wide;
}

}  // namespace

TEMPLATE_TEST_CASE("add_matmul_nn and add_matmul_tn are within gamma_{k+3} of the reference on tile and tail edges", "[kernel][matmul_nn]",
                   kernels::default_arch, kernels::scalar) {
  constexpr Index w = kernels::detail::panel_width<float, TestType>();
  constexpr Index r = kernels::detail::panel_rows<float, TestType>();
  moe::test::Rng rng(0x4E4E0001);
  for (const Index m : {Index{1}, r - 1, r, r + 1, 2 * r + 1}) {
    for (const Index n : {Index{1}, w / 2 - 1, w / 2 + 1, w - 1, w, w + 1, 2 * w + 3}) {
      for (const Index k : {Index{0}, Index{1}, Index{17}, Index{64}}) {
        check_nn<float, TestType>(rng, m, n, k, false);
        check_nn<float, TestType>(rng, m, n, k, false, true);
      }
    }
  }
  check_nn<float, TestType>(rng, 37, 3 * w, 1000, false);
  check_nn<double, TestType>(rng, 13, 2 * w + 1, 257, false);
  check_nn<float, TestType>(rng, 300, 3 * w + 1, 129, false, true);
  check_nn<double, TestType>(rng, 25, 2 * w + 1, 41, false, true);
}

TEMPLATE_TEST_CASE("add_matmul_nn and add_matmul_tn exact mode is bitwise equal to the reference", "[kernel][matmul_nn]",
                   kernels::default_arch, kernels::scalar) {
  constexpr Index w = kernels::detail::panel_width<float, TestType>();
  moe::test::Rng rng(0x4E4E0002);
  for (const Index m : {Index{1}, Index{5}, Index{13}, Index{25}})
    for (const Index k : {Index{1}, Index{31}, Index{500}}) {
      check_nn<float, TestType>(rng, m, 2 * w + 5, k, true);
      check_nn<float, TestType>(rng, m, 2 * w + 5, k, true, true);
    }
}

TEST_CASE("add_matmul_nn and add_matmul_tn give the same bits on the SIMD and the scalar path", "[kernel][matmul_nn]") {
  // One fused multiply-add chain per element, over k in order, on both paths.
  moe::test::Rng simd_rng(0x4E4E0003), scalar_rng(0x4E4E0003);
  const RowMatrix<float> simd = check_nn<float, kernels::default_arch>(simd_rng, 29, 77, 300, false);
  const RowMatrix<float> plain = check_nn<float, kernels::scalar>(scalar_rng, 29, 77, 300, false);
  CHECK(simd == plain);
  const RowMatrix<float> simd_t = check_nn<float, kernels::default_arch>(simd_rng, 77, 45, 129, false, true);
  const RowMatrix<float> plain_t = check_nn<float, kernels::scalar>(scalar_rng, 77, 45, 129, false, true);
  CHECK(simd_t == plain_t);
}

TEST_CASE("parallel_add_matmul_nn/tn give the serial products' bits across the 64-row chunks", "[kernel][matmul_nn]") {
  // The row chunks (and the threads running them) must not change a bit: each element is one chain. n = 700
  // with m >= 65 is above k_parallel_min_work, so a team runs it.
  moe::test::Rng rng(4);
  for (const Index m : {1, 63, 64, 65, 130}) {
    for (const auto& [k, n] : {std::pair<Index, Index>{1, 9}, {17, 9}, {17, 700}}) {
      INFO("m = " << m << ", k = " << k << ", n = " << n);
      const RowMatrix<double> a = operand<double>(rng, m, k, 0), at = operand<double>(rng, k, m, 0);
      const RowMatrix<double> b = operand<double>(rng, k, n, 0), c0 = operand<double>(rng, m, n, 0);
      RowMatrix<double> c = c0, ct = c0, c_serial = c0, ct_serial = c0;
      kernels::parallel_add_matmul_nn<double>(kernels::default_arch{}, a, b, c);
      kernels::parallel_add_matmul_tn<double>(kernels::default_arch{}, at, b, ct);
      kernels::add_matmul_nn(kernels::default_arch{}, moe::ConstMatrixView<double>(a), moe::ConstMatrixView<double>(b),
                             moe::MatrixView<double>(c_serial));
      kernels::add_matmul_tn(kernels::default_arch{}, moe::ConstMatrixView<double>(at), moe::ConstMatrixView<double>(b),
                             moe::MatrixView<double>(ct_serial));
      CHECK(c == c_serial);
      CHECK(ct == ct_serial);
      RowMatrix<double> ref = c0, ref_t = c0;
      kernels::reference::add_matmul_nn<double>(a, b, ref);
      kernels::reference::add_matmul_nn<double>(RowMatrix<double>(at.transpose()), b, ref_t);
      CHECK((c - ref).cwiseAbs().maxCoeff() <= 1e-12);
      CHECK((ct - ref_t).cwiseAbs().maxCoeff() <= 1e-12);
    }
  }
}
