// kernels/simd/softmax.hpp against the double reference (RELIABILITY.md N3), for the default xsimd
// architecture and the scalar fallback.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/softmax.hpp>
#include <moe/kernels/simd/softmax.hpp>

#include "support/random.hpp"

namespace {

using moe::Index;
namespace kernels = moe::kernels;

constexpr Index k_sizes[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 1025};
constexpr double eps32 = 0x1.0p-23;
constexpr double u32 = 0x1.0p-24;
constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

/// A buffer of n elements between two 1024-element guard bands filled with a NaN canary bit pattern.
template <class T>
class Guarded {
 public:
  static constexpr Index guard = 1024;
  explicit Guarded(Index n) : buf_(static_cast<std::size_t>(n + 2 * guard), canary()), n_(n) {}
  T* data() { return buf_.data() + guard; }
  /// True when both guard bands still hold the canary, bit for bit.
  bool guards_intact() const {
    const T c = canary();
    for (Index i = 0; i < guard; ++i) {
      if (std::memcmp(&buf_[static_cast<std::size_t>(i)], &c, sizeof(T)) != 0) return false;
      if (std::memcmp(&buf_[static_cast<std::size_t>(guard + n_ + i)], &c, sizeof(T)) != 0) return false;
    }
    return true;
  }
  static T canary() {
    if constexpr (sizeof(T) == 4) return std::bit_cast<T>(std::uint32_t{0x7FA5A5A5u});
    else return std::bit_cast<T>(std::uint64_t{0x7FF5A5A5A5A5A5A5ull});
  }

 private:
  std::vector<T> buf_;
  Index n_;
};

enum class RowKind { normal, wide, all_negative, above_exp_overflow, below_exp_underflow, mixed_extremes, equal, pm_1e30 };
constexpr RowKind k_row_kinds[] = {RowKind::normal,          RowKind::wide,
                                   RowKind::all_negative,    RowKind::above_exp_overflow,
                                   RowKind::below_exp_underflow, RowKind::mixed_extremes,
                                   RowKind::equal,           RowKind::pm_1e30};

std::vector<float> make_row(moe::test::Rng& rng, RowKind kind, Index n) {
  std::vector<float> row(static_cast<std::size_t>(n));
  for (auto& v : row) {
    double x = 0.0;
    switch (kind) {
      case RowKind::normal: x = rng.normal(); break;
      case RowKind::wide: x = 10.0 * rng.normal(); break;
      case RowKind::all_negative: x = -50.0 - 5.0 * std::abs(rng.normal()); break;
      case RowKind::above_exp_overflow: x = rng.uniform(88.8, 120.0); break;  // exp(x) overflows f32
      case RowKind::below_exp_underflow: x = rng.uniform(-200.0, -104.0); break;  // exp(x) underflows f32
      case RowKind::mixed_extremes: {
        const Index pick = rng.below(3);
        x = pick == 0 ? rng.uniform(88.8, 120.0) : pick == 1 ? rng.uniform(-200.0, -104.0) : rng.normal();
        break;
      }
      case RowKind::equal: x = 3.25; break;
      case RowKind::pm_1e30: {
        const Index pick = rng.below(3);
        x = pick == 0 ? 1e30 : pick == 1 ? -1e30 : rng.normal();
        break;
      }
    }
    v = static_cast<float>(x);
  }
  return row;
}

/// The N3 criteria for an f32 softmax row against the f64 reference on the same (widened) input.
/// Returns the largest relative error seen among entries with p > 1e-5.
double check_f32_row(const std::vector<float>& in, const float* got) {
  const Index n = static_cast<Index>(in.size());
  std::vector<double> in64(in.begin(), in.end()), ref(in.size());
  kernels::reference::softmax_row(in64.data(), ref.data(), n);
  Index bad = 0, first_bad = -1;
  double worst_rel = 0.0, sum = 0.0;
  for (Index i = 0; i < n; ++i) {
    const double p = ref[static_cast<std::size_t>(i)], g = got[i], err = std::abs(g - p);
    const bool ok = std::isfinite(g) && (p > 1e-5 ? err <= 10.0 * eps32 * p : err <= 1.19e-6);
    if (p > 1e-5 && err / p > worst_rel) worst_rel = err / p;
    if (!ok && bad++ == 0) first_bad = i;
    sum += g;
  }
  INFO("n = " << n << ", first bad index " << first_bad
              << (first_bad >= 0 ? " got " + std::to_string(got[first_bad]) + " ref " +
                                       std::to_string(ref[static_cast<std::size_t>(first_bad)])
                                 : std::string()));
  CHECK(bad == 0);
  if (n > 0) CHECK(std::abs(sum - 1.0) <= static_cast<double>(n) * u32 + 1e-6);
  return worst_rel;
}

}  // namespace

TEMPLATE_TEST_CASE("softmax_row f32 matches the f64 reference within N3 bounds", "[kernel][softmax]",
                   kernels::default_arch, kernels::scalar) {
  moe::test::Rng rng(0x5EED0001);
  double worst_rel = 0.0;
  for (const Index n : k_sizes) {
    for (const RowKind kind : k_row_kinds) {
      INFO("n = " << n << ", row kind " << static_cast<int>(kind) << ", arch " << TestType::name());
      const std::vector<float> in = make_row(rng, kind, n);
      Guarded<float> out(n);
      kernels::softmax_row(TestType{}, in.data(), out.data(), n);
      CHECK(out.guards_intact());
      const double rel = check_f32_row(in, out.data());
      worst_rel = rel > worst_rel ? rel : worst_rel;

      // In place (in == out) gives the same bits.
      std::vector<float> inplace = in;
      kernels::softmax_row(TestType{}, inplace.data(), inplace.data(), n);
      CHECK((n == 0 || std::memcmp(inplace.data(), out.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0));
    }
  }
  // Measured worst over these rows and more seeds: 5.7e-7 (4.8 eps32) avx512bw, 7.0e-7 (5.9 eps32)
  // fma3+avx2, 5.4e-7 scalar; mostly the rounding of x - max, amplified by |x - max| <= 11.5 for
  // p > 1e-5. Checked per entry above; this single check names the worst value if it ever fails.
  INFO("worst relative error for p > 1e-5: " << worst_rel);
  CHECK(worst_rel <= 10.0 * eps32);
}

TEMPLATE_TEST_CASE("softmax_row f64 matches the f64 reference", "[kernel][softmax]", kernels::default_arch,
                   kernels::scalar) {
  moe::test::Rng rng(0x5EED0002);
  for (const Index n : k_sizes) {
    const std::vector<double> in = moe::test::normal_vector<double>(rng, n, 4.0);
    std::vector<double> got(in.size()), ref(in.size());
    kernels::softmax_row(TestType{}, in.data(), got.data(), n);
    kernels::reference::softmax_row(in.data(), ref.data(), n);
    for (Index i = 0; i < n; ++i) {
      const auto j = static_cast<std::size_t>(i);
      INFO("n = " << n << ", i = " << i);
      CHECK(std::abs(got[j] - ref[j]) <= 1e-14 * ref[j] + 1e-300);
    }
  }
}

TEMPLATE_TEST_CASE("softmax_row follows the non-finite policy", "[kernel][softmax]", kernels::default_arch,
                   kernels::scalar) {
  const TestType arch{};
  auto run = [&](const std::vector<float>& in) {
    std::vector<float> out(in.size(), -1.0f);
    kernels::softmax_row(arch, in.data(), out.data(), static_cast<Index>(in.size()));
    for (const float p : out) REQUIRE(std::isfinite(p));
    return out;
  };

  SECTION("single entries") {
    CHECK(run({inf}) == std::vector<float>{1.0f});
    CHECK(run({-inf}) == std::vector<float>{0.0f});
    CHECK(run({qnan}) == std::vector<float>{0.0f});
    CHECK(run({2.5f}) == std::vector<float>{1.0f});
  }
  // Long rows put the special values both in the vector body and in the scalar tail.
  for (const Index n : {Index{3}, Index{17}, Index{33}, Index{1025}}) {
    std::vector<Index> at = n == 3 ? std::vector<Index>{0, 2} : std::vector<Index>{0, 5, 16, n - 1};
    at.erase(std::unique(at.begin(), at.end()), at.end());  // n = 17: 16 == n - 1
    std::vector<float> base(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) base[static_cast<std::size_t>(i)] = static_cast<float>(i % 7) - 3.0f;
    INFO("n = " << n);

    SECTION("+inf entries share the weight, n = " + std::to_string(n)) {
      std::vector<float> in = base;
      for (const Index i : at) in[static_cast<std::size_t>(i)] = inf;
      in[1] = qnan;  // NaN and -inf next to +inf still get 0
      if (n > 3) in[static_cast<std::size_t>(n - 2)] = -inf;
      const std::vector<float> out = run(in);
      const float share = 1.0f / static_cast<float>(at.size());
      for (Index i = 0; i < n; ++i) {
        const auto j = static_cast<std::size_t>(i);
        CHECK(out[j] == (in[j] == inf ? share : 0.0f));
      }
    }
    SECTION("a row with nothing above -inf is all zero, n = " + std::to_string(n)) {
      for (const int variant : {0, 1, 2}) {
        std::vector<float> in(static_cast<std::size_t>(n), variant == 1 ? qnan : -inf);
        if (variant == 2) {
          for (const Index i : at) in[static_cast<std::size_t>(i)] = qnan;
        }
        for (const float p : run(in)) CHECK(p == 0.0f);
      }
    }
    SECTION("NaN and -inf entries get 0, the rest is a normal softmax, n = " + std::to_string(n)) {
      std::vector<float> in = base;
      for (std::size_t j = 0; j < at.size(); ++j) in[static_cast<std::size_t>(at[j])] = j % 2 == 0 ? qnan : -inf;
      const std::vector<float> out = run(in);
      for (const Index i : at) CHECK(out[static_cast<std::size_t>(i)] == 0.0f);
      check_f32_row(in, out.data());
    }
    SECTION("NaN between logits above exp overflow, n = " + std::to_string(n)) {
      // A max that forgot a value (a NaN lane resetting it) would overflow exp(x - max) here, where a
      // merely shifted max would not show.
      moe::test::Rng rng(0x5EED0004);
      std::vector<float> in(static_cast<std::size_t>(n));
      for (Index i = 0; i < n; ++i) {
        in[static_cast<std::size_t>(i)] = i % 3 == 1 ? qnan : static_cast<float>(rng.uniform(0.0, 100.0));
      }
      in[0] = 300.0f;  // the max, first in its lane, followed by NaNs and smaller values in the same lane
      const std::vector<float> out = run(in);
      check_f32_row(in, out.data());
    }
  }
}

TEMPLATE_TEST_CASE("softmax_row writes only its n outputs", "[kernel][softmax]", kernels::default_arch,
                   kernels::scalar) {
  moe::test::Rng rng(0x5EED0003);
  for (const Index n : k_sizes) {
    INFO("n = " << n);
    const std::vector<double> in = moe::test::normal_vector<double>(rng, n);
    Guarded<double> out(n);
    kernels::softmax_row(TestType{}, in.data(), out.data(), n);
    CHECK(out.guards_intact());
  }
  // n == 0 reads and writes nothing, even through null pointers.
  kernels::softmax_row(TestType{}, static_cast<const float*>(nullptr), static_cast<float*>(nullptr), 0);
}
