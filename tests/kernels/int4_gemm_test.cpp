// kernels/simd/int4_gemm.hpp (RELIABILITY.md N4): against a double reference on the values the kernel computes
// with (int8 image of x per row, reference::int4_image of w per group), within gamma_{k+2} of the magnitude the
// kernel's f32 sums carry (|x| plus the +128 offset of its unsigned activations); the native ISA bit for bit
// equal to the scalar path; NMSE against the unrounded f32 product within q4 rounding noise; f16 scales.

#include <bit>
#include <cstring>

#include <moe/kernels/reference/int4_gemm.hpp>
#include <moe/kernels/simd/int4_gemm.hpp>

#include "panel_support.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

template <Index Group, class Scales>
RowMatrix<double> int4_image(const RowMatrix<float>& a) {
  RowMatrix<double> out(a.rows(), a.cols());
  for (Index i = 0; i < a.rows(); ++i) {
    kernels::reference::int4_image(a.row(i).data(), a.cols(), Group, std::is_same_v<Scales, kernels::F16Scales>,
                                   out.row(i).data());
  }
  return out;
}

// q4 rounding of N(0, 1) groups: d = max|w| / 8 ~ 0.3, noise d^2 / 12 ~ 0.008 of the weights' variance on
// average; a draw with 15 weight rows of one group each was seen at 0.014.
constexpr double k_nmse_f32 = 0.02;

template <class Arch, Index Group, class Scales>
RowMatrix<double> check_int4(moe::test::Rng& rng, Index m, Index n, Index k, int n_src) {
  using Kernel = kernels::Int4Panels<float, Arch, Group, Scales>;
  INFO("m = " << m << ", n = " << n << ", k = " << k << ", sources = " << n_src << ", group " << Group);
  const RowMatrix<float> x = moe::test::panel_operand<float>(rng, m, k, 0);
  std::vector<RowMatrix<float>> w;
  std::vector<RowMatrix<double>> w_seen;
  for (int s = 0; s < n_src; ++s) {
    w.push_back(moe::test::panel_operand<float>(rng, n, k, 0));
    w_seen.push_back(int4_image<Group, Scales>(w.back()));
  }
  const RowMatrix<double> y = moe::test::run_panels<Kernel>(w, x);
  const RowMatrix<double> x_seen = moe::test::int8_image(x);
  RowMatrix<double> x_mag = x_seen.cwiseAbs();
  for (Index i = 0; i < m; ++i) x_mag.row(i).array() += 128.0 * double(x.row(i).cwiseAbs().maxCoeff() / 127.0f);
  moe::test::check_panels(y, x_seen, w_seen, false, 1e-7, moe::test::gamma_n<float>(double(k + 2)), &x_mag);
  if (k >= 64 && m * n * n_src >= 256) {
    RowMatrix<double> y_f32(m, n_src * n);
    for (int s = 0; s < n_src; ++s)
      y_f32.middleCols(s * n, n) = x.cast<double>() * w[static_cast<std::size_t>(s)].cast<double>().transpose();
    const double err = moe::test::nmse(y_f32.data(), y.data(), static_cast<std::size_t>(y.size()));
    INFO("NMSE against f32 " << err);
    CHECK(err <= k_nmse_f32);
  }
  return y;
}

template <Index Group, class Scales>
void check_shapes() {
  using Kernel = kernels::Int4Panels<float, kernels::default_arch, Group, Scales>;
  moe::test::Rng rng(0x14A40001 + Group);
  for (const Index m : moe::test::tile_rows<Kernel>()) {
    for (const Index n : moe::test::tile_cols<Kernel>()) {
      for (const Index k : {Index{1}, Index{5}, Group - 1, Group, Group + 1, 2 * Group + 7}) {
        for (const int n_src : {1, 2}) {
          // The same draw through the native ISA and the scalar path: equal bit for bit.
          moe::test::Rng copy = rng;
          const RowMatrix<double> y = check_int4<kernels::default_arch, Group, Scales>(rng, m, n, k, n_src);
          const RowMatrix<double> y_scalar = check_int4<kernels::scalar, Group, Scales>(copy, m, n, k, n_src);
          CHECK(std::memcmp(y.data(), y_scalar.data(), sizeof(double) * static_cast<std::size_t>(y.size())) == 0);
        }
      }
    }
  }
  moe::test::Rng copy = rng;
  const RowMatrix<double> y = check_int4<kernels::default_arch, Group, Scales>(rng, 17, 65, 1001, 2);
  CHECK(y == check_int4<kernels::scalar, Group, Scales>(copy, 17, 65, 1001, 2));
  check_int4<kernels::default_arch, Group, Scales>(rng, 1, 33, 3584, 1);
}

}  // namespace

TEST_CASE("int4 panel_gemm is within gamma_{k+2} of the reference and bitwise equal to the scalar path",
          "[kernel][int4]") {
  check_shapes<32, kernels::F16Scales>();
  check_shapes<64, kernels::F16Scales>();
  check_shapes<32, kernels::F32Scales>();
}

TEST_CASE("int4 quantisation of a group: q4_0's scale, ties to even, zero groups, short groups", "[kernel][int4]") {
  using Kernel = kernels::Int4Panels<float, kernels::scalar, 32, kernels::F32Scales>;
  // m = -4 (largest magnitude, first on ties with +4): d = 0.5, so w / d = -8, 8 -> 7, 1, 2.5 -> 2 (even), ...
  const float v[6] = {1.0f, -4.0f, 4.0f, 0.5f, 1.25f, -0.25f};
  std::int8_t q[32];
  CHECK(Kernel::quantise_group(v, 6, q) == 0.5f);
  const int expected[6] = {2, -8, 7, 1, 2, 0};  // 1.25 / 0.5 = 2.5 -> 2, -0.25 / 0.5 = -0.5 -> -0
  for (int i = 0; i < 6; ++i) CHECK(int(q[i]) == expected[i]);
  for (int i = 6; i < 32; ++i) CHECK(int(q[i]) == 0);
  const float zeros[3] = {};
  CHECK(Kernel::quantise_group(zeros, 3, q) == 0.0f);
  for (const std::int8_t e : q) CHECK(int(e) == 0);
}

TEST_CASE("f16 scales: every f16 decodes exactly; encoding rounds to nearest even and saturates", "[kernel][int4]") {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    if (((h >> 10) & 0x1Fu) == 0x1Fu) continue;  // inf / NaN are never stored
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = kernels::detail::from_f16(bits);
    const int e = static_cast<int>((h >> 10) & 0x1Fu), mant = static_cast<int>(h & 0x3FFu);
    const double expect =
        (h & 0x8000u ? -1.0 : 1.0) * (e == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, e - 25));
    if (static_cast<double>(f) != expect) FAIL("f16 " << h << " decodes to " << f << ", not " << expect);
    if (kernels::detail::to_f16(f) != bits && !(mant == 0 && e == 0)) FAIL("f16 " << h << " does not round-trip");
  }
  moe::test::Rng rng(7);
  std::vector<float> values = {0.0f,           65504.0f,           65519.0f,          65520.0f,       1e9f,
                               -1e9f,          6.1035156e-05f,     5.9604645e-08f,    2.9802322e-08f, 2.9802326e-08f,
                               8.9406967e-08f, 1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048};
  for (int i = 0; i < 20000; ++i)
    values.push_back(static_cast<float>(rng.normal() * std::ldexp(1.0, int(rng.below(50)) - 30)));
  for (const float v : values) {
    INFO("v = " << v);
    CHECK(static_cast<double>(kernels::detail::from_f16(kernels::detail::to_f16(v))) ==
          kernels::reference::round_to_f16(v));
  }
}

TEST_CASE("int4 panels: matches() sees a changed weight; the offsets make a zero row exactly zero", "[kernel][int4]") {
  using Kernel = kernels::Int4Panels<float, kernels::default_arch, 32, kernels::F16Scales>;
  moe::test::Rng rng(3);
  RowMatrix<float> w = moe::test::panel_operand<float>(rng, 19, 70, 0);
  kernels::PackedWeights<Kernel> packed(1, 19, 70, 1);
  const moe::ConstMatrixView<float> src(w);
  packed.pack(0, &src);
  CHECK(packed.matches(0, &src));
  w(5, 40) += 3.0f;
  CHECK_FALSE(packed.matches(0, &src));
  const RowMatrix<float> zeros = RowMatrix<float>::Zero(3, 70);
  const RowMatrix<double> y = moe::test::run_panels<Kernel>(std::vector<RowMatrix<float>>{w}, zeros);
  CHECK(y.cwiseAbs().maxCoeff() == 0.0);
}
