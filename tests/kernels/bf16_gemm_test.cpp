// kernels/simd/bf16_gemm.hpp against a double reference on the bf16 images of x and w (RELIABILITY.md N4):
// the gamma_{k+2} bound per element, exact mode bitwise, and NMSE <= 5e-4 against the f32 inputs, on tile,
// panel and pair edges, for the default architecture (vdpbf16ps with AVX512-BF16) and the scalar fallback.

#include <moe/kernels/reference/bf16_gemm.hpp>
#include <moe/kernels/simd/bf16_gemm.hpp>

#include "panel_support.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

RowMatrix<double> bf16_image(const RowMatrix<float>& a) {
  RowMatrix<double> out(a.rows(), a.cols());
  for (Index i = 0; i < a.rows(); ++i) kernels::reference::bf16_image(a.row(i).data(), a.cols(), out.row(i).data());
  return out;
}

template <class Arch>
void check_bf16(moe::test::Rng& rng, Index m, Index n, Index k, int n_src, bool exact) {
  using Kernel = kernels::BF16Panels<float, Arch>;
  INFO("m = " << m << ", n = " << n << ", k = " << k << ", sources = " << n_src << (exact ? ", exact" : ""));
  const RowMatrix<float> x = moe::test::panel_operand<float>(rng, m, k, exact ? 4 : 0);
  std::vector<RowMatrix<float>> w;
  std::vector<RowMatrix<double>> w_seen, w_f32;
  for (int s = 0; s < n_src; ++s) {
    w.push_back(moe::test::panel_operand<float>(rng, n, k, exact ? 2 : 0));
    w_seen.push_back(bf16_image(w.back()));
    w_f32.push_back(w.back().cast<double>());
  }
  const RowMatrix<double> y = moe::test::run_panels<Kernel>(w, x);
  moe::test::check_panels(y, bf16_image(x), w_seen, exact, 1e-7, moe::test::gamma_n<float>(static_cast<double>(k + 2)));
  if (!exact && k >= 16 && m * n * n_src >= 256) {
    // Whole-tensor sanity against the unrounded inputs.
    RowMatrix<double> y_f32(m, n_src * n);
    for (int s = 0; s < n_src; ++s) y_f32.middleCols(s * n, n) = x.cast<double>() * w_f32[static_cast<std::size_t>(s)].transpose();
    CHECK(moe::test::nmse(y_f32.data(), y.data(), static_cast<std::size_t>(y.size())) <= 5e-4);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("bf16 panel_gemm is within gamma_{k+2} of the reference on its bf16 inputs",
                   "[kernel][bf16]", kernels::default_arch, kernels::scalar) {
  using Kernel = kernels::BF16Panels<float, TestType>;
  moe::test::Rng rng(0xBF160001);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index n : moe::test::tile_cols<Kernel>()) {
      for (const Index k : {Index{1}, Index{2}, Index{3}, Index{17}, Index{34}}) {
        for (const int n_src : {1, 2}) check_bf16<TestType>(rng, m, n, k, n_src, false);
      }
    }
  }
  check_bf16<TestType>(rng, 17, 65, 1001, 2, false);
}

TEMPLATE_TEST_CASE("bf16 panel_gemm exact mode is bitwise equal to the reference", "[kernel][bf16]",
                   kernels::default_arch, kernels::scalar) {
  using Kernel = kernels::BF16Panels<float, TestType>;
  moe::test::Rng rng(0xBF160002);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index k : {Index{1}, Index{17}, Index{1025}}) check_bf16<TestType>(rng, m, Kernel::width + 1, k, 2, true);
  }
}

TEST_CASE("bf16 rounding is to nearest, ties to even", "[kernel][bf16]") {
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
  CHECK(kernels::detail::from_bf16(kernels::detail::to_bf16(1.0f + 0x1p-8f)) == 1.0f);
  CHECK(kernels::detail::from_bf16(kernels::detail::to_bf16(1.0f + 0x1p-7f + 0x1p-8f)) == 1.0f + 0x1p-6f);
  CHECK(kernels::reference::round_to_bf16(1.0 + 0x1p-8) == 1.0);
  CHECK(kernels::reference::round_to_bf16(1.0 + 0x1p-7 + 0x1p-8) == 1.0 + 0x1p-6);
}
