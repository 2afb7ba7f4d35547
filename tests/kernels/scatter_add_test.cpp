// kernels/simd/scatter_add.hpp (axpy and the MoE combine) against the reference, for the default
// architecture and the scalar fallback: exact mode bitwise (RELIABILITY.md N2), random data within the
// gamma bound, dropped slots, determinism and untouched row gaps.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/scatter_add.hpp>
#include <moe/kernels/simd/scatter_add.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

namespace {

using moe::Index;
namespace kernels = moe::kernels;

constexpr Index k_sizes[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 1025};
const float canary = std::bit_cast<float>(std::uint32_t{0x7FA5A5A5u});

/// A combine problem: out (n_tokens, d) with row stride d + 3 (the gaps hold a canary), src
/// (n_tokens * k, d), and per (token, slot) a src row (a permutation, some dropped) and a weight.
struct Problem {
  Index n_tokens, d, k, stride;
  std::vector<float> out;      // (n_tokens, stride)
  std::vector<float> src;      // (n_tokens * k, d)
  std::vector<Index> src_row;  // (n_tokens, k)
  std::vector<float> weight;   // (n_tokens, k)

  moe::MatrixView<float> out_view() { return {out.data(), n_tokens, d, stride}; }
  moe::ConstMatrixView<float> src_view() const { return {src.data(), n_tokens * k, d}; }
};

/// exact: integer data in [-8, 8] and weights in {1, 1/2, 1/4}, so every sum is exact in f32.
Problem make_problem(moe::test::Rng& rng, Index n_tokens, Index d, Index k, bool exact) {
  Problem p{n_tokens, d, k, d + 3, {}, {}, {}, {}};
  auto value = [&] { return exact ? static_cast<float>(rng.below(17) - 8) : static_cast<float>(rng.normal()); };
  p.out.assign(static_cast<std::size_t>(n_tokens * p.stride), canary);
  for (Index t = 0; t < n_tokens; ++t) {
    for (Index j = 0; j < d; ++j) p.out[static_cast<std::size_t>(t * p.stride + j)] = value();
  }
  p.src.resize(static_cast<std::size_t>(n_tokens * k * d));
  for (auto& v : p.src) v = value();
  p.src_row.resize(static_cast<std::size_t>(n_tokens * k));
  std::iota(p.src_row.begin(), p.src_row.end(), Index{0});
  for (Index i = n_tokens * k - 1; i > 0; --i) {
    std::swap(p.src_row[static_cast<std::size_t>(i)], p.src_row[static_cast<std::size_t>(rng.below(i + 1))]);
  }
  p.weight.resize(p.src_row.size());
  const float exact_weights[] = {1.0f, 0.5f, 0.25f};
  for (std::size_t s = 0; s < p.weight.size(); ++s) {
    p.weight[s] = exact ? exact_weights[rng.below(3)] : static_cast<float>(rng.uniform());
    // A dropped slot gets a NaN weight: if it were used anyway, the output would show it.
    if (rng.below(5) == 0) {
      p.src_row[s] = -1;
      p.weight[s] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return p;
}

/// The reference in double on the widened problem: (n_tokens, d), contiguous.
std::vector<double> reference_result(const Problem& p) {
  std::vector<double> out(static_cast<std::size_t>(p.n_tokens * p.d)), src(p.src.begin(), p.src.end()),
      weight(p.weight.begin(), p.weight.end());
  for (Index t = 0; t < p.n_tokens; ++t) {
    for (Index j = 0; j < p.d; ++j) out[static_cast<std::size_t>(t * p.d + j)] = p.out[static_cast<std::size_t>(t * p.stride + j)];
  }
  kernels::reference::scatter_add(moe::MatrixView<double>(out.data(), p.n_tokens, p.d),
                                  moe::ConstMatrixView<double>(src.data(), p.n_tokens * p.k, p.d), p.src_row.data(),
                                  weight.data(), p.k);
  return out;
}

bool gaps_intact(const Problem& p) {
  for (Index t = 0; t < p.n_tokens; ++t) {
    for (Index j = p.d; j < p.stride; ++j) {
      if (std::memcmp(&p.out[static_cast<std::size_t>(t * p.stride + j)], &canary, sizeof(float)) != 0) return false;
    }
  }
  return true;
}

}  // namespace

TEMPLATE_TEST_CASE("axpy matches the reference", "[kernel][scatter_add]", kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x5CA70001);
  for (const Index n : k_sizes) {
    INFO("n = " << n);
    // Exact mode: bitwise.
    std::vector<float> x(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n) + 1, 77.0f);
    for (auto& v : x) v = static_cast<float>(rng.below(17) - 8);
    for (Index i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<float>(rng.below(17) - 8);
    std::vector<double> x64(x.begin(), x.end()), y64(y.begin(), y.end() - 1);
    kernels::axpy(TestType{}, 0.25f, x.data(), y.data(), n);
    kernels::reference::axpy(0.25, x64.data(), y64.data(), n);
    CHECK(y.back() == 77.0f);  // nothing written past y[n - 1]
    for (Index i = 0; i < n; ++i) CHECK(y[static_cast<std::size_t>(i)] == static_cast<float>(y64[static_cast<std::size_t>(i)]));

    // Random data: one product and one sum, so |err| <= gamma_2 (|y| + |a x|).
    const std::vector<float> xr = moe::test::normal_vector<float>(rng, n), y0 = moe::test::normal_vector<float>(rng, n);
    std::vector<float> yr = y0;
    const float a = 0.3f;
    kernels::axpy(TestType{}, a, xr.data(), yr.data(), n);
    Index bad = 0;
    for (std::size_t i = 0; i < xr.size(); ++i) {
      const double ref = static_cast<double>(y0[i]) + static_cast<double>(a) * xr[i];
      const double bound = moe::test::gamma_n<float>(2) * (std::abs(static_cast<double>(y0[i])) + std::abs(static_cast<double>(a) * xr[i]));
      bad += std::abs(yr[i] - ref) <= bound ? 0 : 1;
    }
    CHECK(bad == 0);
  }
}

TEMPLATE_TEST_CASE("scatter_add exact mode is bitwise equal to the reference", "[kernel][scatter_add]",
                   kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x5CA70002);
  for (const Index n_tokens : {Index{0}, Index{1}, Index{3}, Index{17}}) {
    for (const Index d : k_sizes) {
      for (const Index k : {Index{1}, Index{2}, Index{3}, Index{8}}) {
        INFO("n_tokens = " << n_tokens << ", d = " << d << ", k = " << k);
        Problem p = make_problem(rng, n_tokens, d, k, /*exact=*/true);
        const std::vector<double> ref = reference_result(p);
        kernels::scatter_add(TestType{}, p.out_view(), p.src_view(), p.src_row.data(), p.weight.data(), k);
        Index bad = 0;
        for (Index t = 0; t < n_tokens; ++t) {
          for (Index j = 0; j < d; ++j) {
            const float got = p.out[static_cast<std::size_t>(t * p.stride + j)];
            const auto want = static_cast<float>(ref[static_cast<std::size_t>(t * d + j)]);
            bad += std::memcmp(&got, &want, sizeof(float)) == 0 ? 0 : 1;
          }
        }
        CHECK(bad == 0);
        CHECK(gaps_intact(p));
      }
    }
  }
}

TEMPLATE_TEST_CASE("scatter_add on random data is within gamma_{k+1} and deterministic", "[kernel][scatter_add]",
                   kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x5CA70003);
  for (const Index d : k_sizes) {
    for (const Index k : {Index{1}, Index{2}, Index{8}}) {
      INFO("d = " << d << ", k = " << k);
      const Index n_tokens = 5;
      Problem p = make_problem(rng, n_tokens, d, k, /*exact=*/false);
      const Problem start = p;
      const std::vector<double> ref = reference_result(p);
      kernels::scatter_add(TestType{}, p.out_view(), p.src_view(), p.src_row.data(), p.weight.data(), k);
      CHECK(gaps_intact(p));

      Index bad = 0;
      for (Index t = 0; t < n_tokens; ++t) {
        for (Index j = 0; j < d; ++j) {
          double magnitude = std::abs(static_cast<double>(start.out[static_cast<std::size_t>(t * p.stride + j)]));
          for (Index s = 0; s < k; ++s) {
            const Index r = p.src_row[static_cast<std::size_t>(t * k + s)];
            if (r >= 0) magnitude += std::abs(static_cast<double>(p.weight[static_cast<std::size_t>(t * k + s)]) * p.src[static_cast<std::size_t>(r * d + j)]);
          }
          const double got = p.out[static_cast<std::size_t>(t * p.stride + j)];
          bad += std::abs(got - ref[static_cast<std::size_t>(t * d + j)]) <= moe::test::gamma_n<float>(static_cast<double>(k + 1)) * magnitude ? 0 : 1;
        }
      }
      CHECK(bad == 0);

      // The same operations as k sequential axpy calls in slot order: identical bits.
      Problem seq = start;
      for (Index t = 0; t < n_tokens; ++t) {
        for (Index s = 0; s < k; ++s) {
          const Index r = seq.src_row[static_cast<std::size_t>(t * k + s)];
          if (r >= 0) kernels::axpy(TestType{}, seq.weight[static_cast<std::size_t>(t * k + s)], seq.src_view().row(r), seq.out_view().row(t), d);
        }
      }
      CHECK(std::memcmp(seq.out.data(), p.out.data(), sizeof(float) * p.out.size()) == 0);

      // The scalar Arch rounds exactly like the vector path: identical bits.
      Problem on_scalar = start;
      kernels::scatter_add(kernels::scalar{}, on_scalar.out_view(), on_scalar.src_view(), on_scalar.src_row.data(),
                           on_scalar.weight.data(), k);
      CHECK(std::memcmp(on_scalar.out.data(), p.out.data(), sizeof(float) * p.out.size()) == 0);

      // Repeating the call gives identical bits.
      Problem again = start;
      kernels::scatter_add(TestType{}, again.out_view(), again.src_view(), again.src_row.data(), again.weight.data(), k);
      CHECK(std::memcmp(again.out.data(), p.out.data(), sizeof(float) * p.out.size()) == 0);
    }
  }
}

TEMPLATE_TEST_CASE("scatter_add skips dropped slots", "[kernel][scatter_add]", kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x5CA70004);
  const Index n_tokens = 4, d = 33, k = 2;
  Problem p = make_problem(rng, n_tokens, d, k, /*exact=*/true);
  for (std::size_t s = 0; s < p.src_row.size(); ++s) {
    p.src_row[s] = -1 - static_cast<Index>(s);  // any negative id means dropped
    p.weight[s] = std::numeric_limits<float>::quiet_NaN();
  }
  const std::vector<float> before = p.out;
  kernels::scatter_add(TestType{}, p.out_view(), p.src_view(), p.src_row.data(), p.weight.data(), k);
  CHECK(std::memcmp(before.data(), p.out.data(), sizeof(float) * before.size()) == 0);

  // Dropping only slot 1 of token 2 leaves token 2 = out + w0 * src[row0].
  Problem q = make_problem(rng, n_tokens, d, k, /*exact=*/true);
  for (std::size_t s = 0; s < q.src_row.size(); ++s) {
    q.src_row[s] = static_cast<Index>(s);
    q.weight[s] = 0.5f;
  }
  q.src_row[2 * k + 1] = -1;
  const Problem q0 = q;
  kernels::scatter_add(TestType{}, q.out_view(), q.src_view(), q.src_row.data(), q.weight.data(), k);
  for (Index j = 0; j < d; ++j) {
    const float want = q0.out[static_cast<std::size_t>(2 * q.stride + j)] + 0.5f * q0.src[static_cast<std::size_t>((2 * k) * d + j)];
    CHECK(q.out[static_cast<std::size_t>(2 * q.stride + j)] == want);
  }
}
