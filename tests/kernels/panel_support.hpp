#pragma once
// Shared by the packed-panel kernel tests (panel_gemm, bf16_gemm, int8_gemm): packs random sources into
// panels, runs panel_gemm over every panel and row, and checks the result against a double reference on the
// values the kernel actually sees (RELIABILITY.md N1, N2, N4).

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/int8_gemm.hpp>
#include <moe/kernels/reference/matmul.hpp>
#include <moe/kernels/simd/panel_gemm.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

namespace moe::test {

/// The dequantised int8 image of each row of a (kernels::reference::int8_image): what the int8 and int4
/// kernels compute with for activations, and the int8 kernel for weight rows.
inline RowMatrix<double> int8_image(const RowMatrix<float>& a) {
  RowMatrix<double> out(a.rows(), a.cols());
  for (Index i = 0; i < a.rows(); ++i) kernels::reference::int8_image(a.row(i).data(), a.cols(), out.row(i).data());
  return out;
}

/// Random (rows, cols): N(0, 1), or integers in [-range, range] when range > 0.
template <class S>
RowMatrix<S> panel_operand(Rng& rng, Index rows, Index cols, int range) {
  RowMatrix<S> a(rows, cols);
  for (Index i = 0; i < a.size(); ++i) {
    a.data()[i] = range > 0 ? static_cast<S>(rng.below(2 * range + 1) - range) : static_cast<S>(rng.normal());
  }
  return a;
}

/// y (m, n_src * n), source s column c at s * n + c: panel_gemm of x against the n_src sources (n, k),
/// packed as matrix 1 of 2 (so panel offsets are exercised), run in two calls over halves of the panels: the
/// first reads contiguous rows, the second the same rows through an index (PanelRows::index).
/// Elements the epilogue never wrote stay NaN.
template <class Kernel, class S>
RowMatrix<double> run_panels(const std::vector<RowMatrix<S>>& w, const RowMatrix<S>& x) {
  using Input = typename Kernel::Input;
  using Out = typename Kernel::Out;
  const int n_src = static_cast<int>(w.size());
  const Index n = w[0].rows(), k = w[0].cols(), m = x.rows();
  kernels::PackedWeights<Kernel> packed(2, n, k, n_src);
  std::vector<ConstMatrixView<S>> src;
  for (const auto& s : w) src.emplace_back(s);
  packed.pack(1, src.data());
  CHECK(packed.matches(1, src.data()));

  // x twice: in order, and with its rows reversed (read back through an index, as the layer's tokens are).
  const Index kp = packed.padded_k();
  std::vector<Input> x_in(static_cast<std::size_t>(2 * m * kp + 1));  // (2m, kp)
  std::vector<float> x_scale(static_cast<std::size_t>(2 * m + 1));    // (2m)
  std::vector<Index> reversed(static_cast<std::size_t>(m));            // (m) row i of x is row reversed[i] of x_in
  for (Index r = 0; r < 2 * m; ++r) {
    const auto x_row = x.row(r < m ? r : 2 * m - 1 - r);
    if constexpr (std::is_same_v<Input, S>) {
      for (Index p = 0; p < kp; ++p) x_in[static_cast<std::size_t>(r * kp + p)] = p < k ? x_row(p) : S(0);
    } else {
      x_scale[static_cast<std::size_t>(r)] = Kernel::encode_row(x_row.data(), k, kp, x_in.data() + r * kp);
    }
  }
  for (Index i = 0; i < m; ++i) reversed[static_cast<std::size_t>(i)] = 2 * m - 1 - i;

  RowMatrix<double> y = RowMatrix<double>::Constant(m, n_src * n, std::numeric_limits<double>::quiet_NaN());
  const Index half = packed.columns_per_source();
  auto epilogue = [&](Index r0, Index rows, Index j, const Out* tile) {
    for (Index i = 0; i < rows; ++i) {
      for (Index c = 0; c < Kernel::width; ++c) {
        const Index s = c / half, col = j * half + c % half;
        if (col < n) y(r0 + i, s * n + col) = static_cast<double>(tile[i * Kernel::width + c]);
      }
    }
  };
  const float* scales = Kernel::row_scaled ? x_scale.data() : nullptr;
  const Index mid = packed.panels() / 2;
  kernels::panel_gemm(packed, 1, 0, mid, kernels::PanelRows<Input>{x_in.data(), kp, nullptr, scales}, m, epilogue);
  kernels::panel_gemm(packed, 1, mid, packed.panels(),
                      kernels::PanelRows<Input>{x_in.data(), kp, reversed.data(), scales}, m, epilogue);
  return y;
}

/// Checks y against x_seen · w_seenᵀ in double: every element within gamma_{k+2} · Σ|x w| (bitwise equal in
/// exact mode) and whole-tensor NMSE <= nmse_bound. x_seen, w_seen: the values the kernel computes with
/// (the inputs themselves, or their bf16 / dequantized int8 images), one row per source row.
/// x_mag: the magnitude of what each x element contributes to the kernel's rounded sums (default |x_seen|).
inline void check_panels(const RowMatrix<double>& y, const RowMatrix<double>& x_seen,
                         const std::vector<RowMatrix<double>>& w_seen, bool exact, double nmse_bound, double gamma,
                         const RowMatrix<double>* x_mag = nullptr) {
  const Index m = x_seen.rows(), n = w_seen[0].rows(), k = x_seen.cols();
  RowMatrix<double> ref(m, static_cast<Index>(w_seen.size()) * n), mag(m, ref.cols());
  const RowMatrix<double> x_abs = x_mag != nullptr ? *x_mag : RowMatrix<double>(x_seen.cwiseAbs());
  for (std::size_t s = 0; s < w_seen.size(); ++s) {
    RowMatrix<double> part(m, n), part_mag(m, n);
    const RowMatrix<double> w_abs = w_seen[s].cwiseAbs();
    kernels::reference::matmul_nt<double>(x_seen, w_seen[s], part);
    kernels::reference::matmul_nt<double>(x_abs, w_abs, part_mag);
    ref.middleCols(static_cast<Index>(s) * n, n) = part;
    mag.middleCols(static_cast<Index>(s) * n, n) = part_mag;
  }
  Index bad = 0;
  for (Index i = 0; i < ref.rows(); ++i) {
    for (Index j = 0; j < ref.cols(); ++j) {
      const double g = y(i, j);
      const bool ok = exact ? g == ref(i, j) : std::isfinite(g) && std::abs(g - ref(i, j)) <= gamma * mag(i, j);
      if (!ok && bad++ == 0) UNSCOPED_INFO("first bad (" << i << ", " << j << "): got " << g << ", ref " << ref(i, j));
    }
  }
  CHECK(bad == 0);
  if (!exact && ref.size() > 0 && k > 0) {
    const double err = nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size()));
    INFO("NMSE " << err);
    CHECK(err <= nmse_bound);
  }
}

/// One case: x (m, k) and n_src weights (n, k), random N(0, 1) or integers (x in [-4, 4], w in [-2, 2]) in
/// exact mode; checked against the images (RowMatrix<S> -> RowMatrix<double>: what the kernel computes with)
/// within gamma_{k+2}, NMSE <= 1e-7 (nmse_bound for T = double), and, when sanity > 0 and the case is large
/// enough for a statistic, NMSE <= sanity against the unrounded inputs (RELIABILITY.md N4).
template <class Kernel, class S, class Image>
void check_kernel(Rng& rng, Index m, Index n, Index k, int n_src, bool exact, Image&& image, double sanity = 0,
                  double nmse_bound = 1e-7) {
  INFO("m = " << m << ", n = " << n << ", k = " << k << ", sources = " << n_src << (exact ? ", exact" : ""));
  const RowMatrix<S> x = panel_operand<S>(rng, m, k, exact ? 4 : 0);
  std::vector<RowMatrix<S>> w;
  std::vector<RowMatrix<double>> w_seen;
  for (int s = 0; s < n_src; ++s) {
    w.push_back(panel_operand<S>(rng, n, k, exact ? 2 : 0));
    w_seen.push_back(image(w.back()));
  }
  const RowMatrix<double> y = run_panels<Kernel>(w, x);
  check_panels(y, image(x), w_seen, exact, nmse_bound, gamma_n<S>(static_cast<double>(k + 2)));
  if (sanity > 0 && !exact && k >= 64 && m * n * n_src >= 256) {
    RowMatrix<double> y_f32(m, n_src * n);
    for (int s = 0; s < n_src; ++s) y_f32.middleCols(s * n, n) = x.template cast<double>() * w[static_cast<std::size_t>(s)].template cast<double>().transpose();
    CHECK(nmse(y_f32.data(), y.data(), static_cast<std::size_t>(y.size())) <= sanity);
  }
}

/// Sizes around a kernel's tiles: one below and above the row tile, the half panel, the panel, two panels.
template <class Kernel>
std::vector<Index> tile_rows() {
  constexpr Index r = Kernel::rows;
  return {1, r - 1, r, r + 1, 2 * r + 1};
}
template <class Kernel>
std::vector<Index> tile_cols() {
  constexpr Index w = Kernel::width, h = w / 2;
  return {1, h - 1, h, h + 1, w - 1, w, w + 1, 2 * w + 1};
}

}  // namespace moe::test
