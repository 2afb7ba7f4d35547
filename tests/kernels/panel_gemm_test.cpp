// kernels/simd/panel_gemm.hpp with weights kept in T (NativePanels) against the double reference
// (RELIABILITY.md N1, N2): tile and panel edges, one and two sources per panel, exact mode bitwise, for the
// default architecture and the scalar fallback.

#include <string>

#include "panel_support.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

template <class T, class Arch>
void check_native(moe::test::Rng& rng, Index m, Index n, Index k, int n_src, bool exact) {
  moe::test::check_kernel<kernels::NativePanels<T, Arch>, T>(
      rng, m, n, k, n_src, exact, [](const RowMatrix<T>& a) { return RowMatrix<double>(a.template cast<double>()); }, 0,
      std::is_same_v<T, float> ? 1e-7 : 1e-20);
}

}  // namespace

TEMPLATE_TEST_CASE("panel_gemm (T weights) is within gamma_{k+2} of the reference on tile edges",
                   "[kernel][panel_gemm]", kernels::default_arch, kernels::scalar) {
  using Kernel = kernels::NativePanels<float, TestType>;
  moe::test::Rng rng(0x9A2E0001);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index n : moe::test::tile_cols<Kernel>()) {
      for (const Index k : {Index{1}, Index{3}, Index{16}, Index{17}, Index{33}}) {
        for (const int n_src : {1, 2}) check_native<float, TestType>(rng, m, n, k, n_src, false);
      }
    }
  }
}

TEMPLATE_TEST_CASE("panel_gemm (T weights) on larger shapes and in double", "[kernel][panel_gemm]",
                   kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x9A2E0002);
  check_native<float, TestType>(rng, 17, 65, 1000, 2, false);
  check_native<float, TestType>(rng, 1, 129, 1025, 1, false);
  check_native<double, TestType>(rng, 13, 33, 257, 2, false);
}

TEMPLATE_TEST_CASE("panel_gemm (T weights) exact mode is bitwise equal to the reference", "[kernel][panel_gemm]",
                   kernels::default_arch, kernels::scalar) {
  using Kernel = kernels::NativePanels<float, TestType>;
  moe::test::Rng rng(0x9A2E0003);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index k : {Index{1}, Index{17}, Index{1025}}) {
      for (const int n_src : {1, 2}) check_native<float, TestType>(rng, m, Kernel::width + 1, k, n_src, true);
    }
  }
}

TEST_CASE("panel_gemm gives the same bits on the SIMD and the scalar path", "[kernel][panel_gemm]") {
  // Each element is one fused multiply-add chain over k in the same order on every path.
  moe::test::Rng rng(0x9A2E0004);
  const RowMatrix<float> x = moe::test::panel_operand<float>(rng, 13, 300, 0);
  const std::vector<RowMatrix<float>> w{moe::test::panel_operand<float>(rng, 37, 300, 0)};
  const RowMatrix<double> a = moe::test::run_panels<kernels::NativePanels<float, kernels::default_arch>>(w, x);
  const RowMatrix<double> b = moe::test::run_panels<kernels::NativePanels<float, kernels::scalar>>(w, x);
#if defined(FP_FAST_FMAF)
  CHECK((a.array() == b.array()).all());
#else
  CHECK(((a - b).array().abs() <= 1e-4 * (a.array().abs() + 1)).all());
#endif
}
