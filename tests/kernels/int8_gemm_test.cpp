// kernels/simd/int8_gemm.hpp against a double reference on the dequantised int8 images of x (per row) and w
// (per output channel) (RELIABILITY.md N4): the gamma_{k+2} bound per element and NMSE <= 5e-4 against the
// f32 inputs, on tile, panel and quad edges, for the default architecture (vpdpbusd with AVX512-VNNI) and the
// scalar fallback.

#include <moe/kernels/reference/int8_gemm.hpp>
#include <moe/kernels/simd/int8_gemm.hpp>

#include "panel_support.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

RowMatrix<double> int8_image(const RowMatrix<float>& a) {
  RowMatrix<double> out(a.rows(), a.cols());
  for (Index i = 0; i < a.rows(); ++i) kernels::reference::int8_image(a.row(i).data(), a.cols(), out.row(i).data());
  return out;
}

// The integer sums are exact: the error is the final conversion and scaling, well inside gamma_{k+2}.
template <class Arch>
void check_int8(moe::test::Rng& rng, Index m, Index n, Index k, int n_src) {
  moe::test::check_kernel<kernels::Int8Panels<float, Arch>, float>(rng, m, n, k, n_src, false, int8_image, 5e-4);
}

}  // namespace

TEMPLATE_TEST_CASE("int8 panel_gemm is within gamma_{k+2} of the reference on its dequantised inputs",
                   "[kernel][int8]", kernels::default_arch, kernels::scalar) {
  using Kernel = kernels::Int8Panels<float, TestType>;
  moe::test::Rng rng(0x18A80001);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index n : moe::test::tile_cols<Kernel>()) {
      for (const Index k : {Index{1}, Index{3}, Index{4}, Index{5}, Index{17}, Index{67}}) {
        for (const int n_src : {1, 2}) check_int8<TestType>(rng, m, n, k, n_src);
      }
    }
  }
  check_int8<TestType>(rng, 17, 65, 1001, 2);
  check_int8<TestType>(rng, 1, 33, 3584, 1);
}

TEST_CASE("int8 quantisation of a zero row gives zero, of an extreme element +-127", "[kernel][int8]") {
  using Kernel = kernels::Int8Panels<float, kernels::scalar>;
  const float zeros[5] = {};
  std::uint8_t q[8];
  CHECK(Kernel::encode_row(zeros, 5, 8, q) == 0.0f);
  for (const std::uint8_t v : q) CHECK(v == 128);
  const float row[3] = {-2.0f, 1.0f, 0.5f};
  const float s = Kernel::encode_row(row, 3, 4, q);
  CHECK(s == 2.0f / 127.0f);
  CHECK(int(q[0]) - 128 == -127);
  CHECK(q[3] == 128);
}
