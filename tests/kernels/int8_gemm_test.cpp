// kernels/simd/int8_gemm.hpp against a double reference on the dequantised int8 images of x (per row) and w
// (per output channel) (RELIABILITY.md N4): the gamma_{k+2} bound per element and NMSE <= 5e-4 against the
// f32 inputs, on tile, panel and quad edges, for the default architecture (vpdpbusd with AVX512-VNNI) and the
// scalar fallback.

#include <moe/kernels/simd/int8_gemm.hpp>

#include "panel_support.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

// The integer sums are exact: the error is the final conversion and scaling, well inside gamma_{k+2}.
template <class Arch>
void check_int8(moe::test::Rng& rng, Index m, Index n, Index k, int n_src) {
  moe::test::check_kernel<kernels::Int8Panels<float, Arch>, float>(rng, m, n, k, n_src, false, moe::test::int8_image,
                                                                   5e-4);
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

TEMPLATE_TEST_CASE("int8 encode_row gives the reference quantisation bit for bit on register edges",
                   "[kernel][int8]", kernels::default_arch, kernels::scalar) {
  // Lengths around the register width, values that are exact .5 ties after scaling (round half to even),
  // signs, and an all-zero row: the vector body and the scalar tail must agree with reference::int8_image.
  using Kernel = kernels::Int8Panels<float, TestType>;
  moe::test::Rng rng(17);
  for (const Index n : {0, 1, 15, 16, 17, 31, 32, 33, 127, 1000}) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      INFO("n = " << n << ", pattern " << pattern);
      std::vector<float> x(static_cast<std::size_t>(n));
      for (Index i = 0; i < n; ++i) {
        const float v = pattern == 0 ? static_cast<float>(rng.normal())
                        : pattern == 1 ? (i == 0 ? 127.0f : static_cast<float>(static_cast<int>(i % 200) - 100) + 0.5f)
                                       : 0.0f;  // pattern 1: s = 1 exactly, every other value a tie
        x[static_cast<std::size_t>(i)] = v;
      }
      const Index n_pad = n + 3;
      std::vector<std::uint8_t> q(static_cast<std::size_t>(n_pad), 7);
      const float s = Kernel::encode_row(x.data(), n, n_pad, q.data());
      std::vector<double> image(static_cast<std::size_t>(n));
      kernels::reference::int8_image(x.data(), n, image.data());
      Index bad = 0;
      for (Index i = 0; i < n; ++i) {
        const double got = (int(q[static_cast<std::size_t>(i)]) - 128) * static_cast<double>(s);
        if (got != image[static_cast<std::size_t>(i)] && bad++ == 0)
          UNSCOPED_INFO("first bad " << i << ": " << got << " vs " << image[static_cast<std::size_t>(i)]);
      }
      CHECK(bad == 0);
      for (Index i = n; i < n_pad; ++i) CHECK(q[static_cast<std::size_t>(i)] == 128);
    }
  }
}
