// kernels/simd/top_k.hpp against the reference (RELIABILITY.md N5): identical ids in every case,
// including ties (lower id first), -0/+0, NaN and +-inf, for the default architecture and the scalar
// fallback.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include <moe/kernels/reference/top_k.hpp>
#include <moe/kernels/simd/top_k.hpp>

#include "support/random.hpp"

namespace {

using moe::Index;
namespace kernels = moe::kernels;

constexpr Index k_sizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 60, 64, 128, 1000, 1025};

std::vector<Index> k_values(Index n) {
  std::vector<Index> ks;
  for (const Index k : {Index{1}, Index{2}, Index{3}, Index{7}, Index{8}, n}) {
    if (k <= n && std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
  }
  return ks;
}

/// The first k of a stable sort by the documented order: an oracle for the oracle.
template <class T>
std::vector<Index> sorted_top_k(const std::vector<T>& scores, Index k) {
  std::vector<Index> ids(scores.size());
  std::iota(ids.begin(), ids.end(), Index{0});
  std::stable_sort(ids.begin(), ids.end(), [&](Index a, Index b) {
    return kernels::reference::top_k_ranks_before(scores[static_cast<std::size_t>(a)], a,
                                                  scores[static_cast<std::size_t>(b)], b);
  });
  ids.resize(static_cast<std::size_t>(k));
  return ids;
}

/// Runs the SIMD kernel (scores in T) and the double reference and requires identical ids.
template <class T, class Arch>
void check_same_ids(Arch arch, const std::vector<T>& scores, Index k) {
  const Index n = static_cast<Index>(scores.size());
  std::vector<Index> got(static_cast<std::size_t>(k) + 1, -7), ref(static_cast<std::size_t>(k));
  kernels::top_k(arch, scores.data(), n, k, got.data());
  REQUIRE(got.back() == -7);  // nothing written past ids[k - 1]
  got.pop_back();
  const std::vector<double> scores64(scores.begin(), scores.end());
  kernels::reference::top_k(scores64.data(), n, k, ref.data());
  INFO("n = " << n << ", k = " << k << ", T = " << (sizeof(T) == 4 ? "float" : "double"));
  REQUIRE(got == ref);
  REQUIRE(ref == sorted_top_k(scores64, k));
  std::vector<Index> sorted = got;
  std::sort(sorted.begin(), sorted.end());
  CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
  CHECK(sorted.front() >= 0);
  CHECK(sorted.back() < n);
}

enum class Kind { distinct, ties, signed_zeros, non_finite };

template <class T>
std::vector<T> make_scores(moe::test::Rng& rng, Kind kind, Index n, Index tie_denom) {
  constexpr T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> s(static_cast<std::size_t>(n));
  // A random permutation, so that tied groups are spread over vector lanes and the tail.
  std::vector<Index> perm(s.size());
  std::iota(perm.begin(), perm.end(), Index{0});
  for (Index i = n - 1; i > 0; --i) std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(rng.below(i + 1))]);
  for (Index i = 0; i < n; ++i) {
    T& v = s[static_cast<std::size_t>(i)];
    switch (kind) {
      case Kind::distinct: v = static_cast<T>(rng.normal()); break;
      case Kind::ties: v = static_cast<T>(perm[static_cast<std::size_t>(i)] / tie_denom) / static_cast<T>(8); break;
      case Kind::signed_zeros: {
        const T pick[] = {T(-0.0), T(0.0), T(1), T(-1)};
        v = pick[rng.below(4)];
        break;
      }
      case Kind::non_finite: {
        const T pick[] = {nan, -nan, inf, -inf, T(-0.0), T(0.0), T(0.5)};
        v = rng.below(3) == 0 ? static_cast<T>(rng.normal()) : pick[rng.below(7)];
        break;
      }
    }
  }
  return s;
}

template <class Arch>
void check_all(Arch arch, Kind kind, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  for (const Index n : k_sizes) {
    for (const Index tie_denom : {Index{2}, Index{3}, Index{8}, n}) {
      if (kind != Kind::ties && tie_denom != n) continue;  // tie_denom only matters for ties
      const std::vector<float> s32 = make_scores<float>(rng, kind, n, tie_denom);
      const std::vector<double> s64 = make_scores<double>(rng, kind, n, tie_denom);
      for (const Index k : k_values(n)) {
        INFO("tie_denom = " << tie_denom);
        check_same_ids(arch, s32, k);
        check_same_ids(arch, s64, k);
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("top_k equals the reference for distinct scores", "[kernel][top_k]", kernels::default_arch,
                   kernels::scalar) {
  check_all(TestType{}, Kind::distinct, 0x70C0001);
  // Distinct scores come out in strictly descending order.
  moe::test::Rng rng(0x70C0002);
  const std::vector<float> s = moe::test::normal_vector<float>(rng, 1025);
  std::vector<Index> ids(64);
  kernels::top_k(TestType{}, s.data(), 1025, 64, ids.data());
  for (std::size_t j = 1; j < ids.size(); ++j) CHECK(s[static_cast<std::size_t>(ids[j - 1])] > s[static_cast<std::size_t>(ids[j])]);
}

TEMPLATE_TEST_CASE("top_k breaks ties by the lower id", "[kernel][top_k]", kernels::default_arch, kernels::scalar) {
  check_all(TestType{}, Kind::ties, 0x70C0003);
  const TestType arch{};
  std::vector<Index> ids(4);
  const std::vector<float> a = {1.0f, 3.0f, 3.0f, 2.0f};
  kernels::top_k(arch, a.data(), 4, 3, ids.data());
  CHECK(ids[0] == 1);
  CHECK(ids[1] == 2);
  CHECK(ids[2] == 3);
  // All equal: the ids in order, also across vector lanes and the tail.
  const std::vector<float> flat(37, 0.25f);
  std::vector<Index> all(37);
  kernels::top_k(arch, flat.data(), 37, 37, all.data());
  for (Index i = 0; i < 37; ++i) CHECK(all[static_cast<std::size_t>(i)] == i);
}

TEMPLATE_TEST_CASE("top_k treats -0.0 and +0.0 as a tie", "[kernel][top_k]", kernels::default_arch,
                   kernels::scalar) {
  check_all(TestType{}, Kind::signed_zeros, 0x70C0004);
  const TestType arch{};
  Index id = -1;
  const float neg_first[] = {-0.0f, 0.0f}, pos_first[] = {0.0f, -0.0f};
  kernels::top_k(arch, neg_first, 2, 1, &id);
  CHECK(id == 0);
  kernels::top_k(arch, pos_first, 2, 1, &id);
  CHECK(id == 0);
  // The same with the zeros in the vector body: 32 entries of -0.0 then +0.0 at the end.
  std::vector<double> row(33, -0.0);
  row.back() = 0.0;
  std::vector<Index> ids(33);
  kernels::top_k(arch, row.data(), 33, 33, ids.data());
  for (Index i = 0; i < 33; ++i) CHECK(ids[static_cast<std::size_t>(i)] == i);
}

TEMPLATE_TEST_CASE("top_k ranks NaN below -inf and handles +-inf", "[kernel][top_k]", kernels::default_arch,
                   kernels::scalar) {
  check_all(TestType{}, Kind::non_finite, 0x70C0005);
  const TestType arch{};
  constexpr float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<Index> ids(5);
  const float a[] = {nan, -inf, nan, inf, 1.0f};
  kernels::top_k(arch, a, 5, 5, ids.data());
  CHECK(ids == std::vector<Index>{3, 4, 1, 0, 2});
  // Many NaNs with one -inf at the end of a long row: -inf still ranks first.
  std::vector<float> b(1025, nan);
  b.back() = -inf;
  kernels::top_k(arch, b.data(), 1025, 3, ids.data());
  CHECK(ids[0] == 1024);
  CHECK(ids[1] == 0);
  CHECK(ids[2] == 1);
}
