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
  moe::test::check_kernel<kernels::BF16Panels<float, Arch>, float>(rng, m, n, k, n_src, exact, bf16_image, 5e-4);
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
