#pragma once
// Central finite differences in double (RELIABILITY.md G1): h = 1e-6, and every checked element must
// satisfy |analytic - numeric| <= 1e-5 + 1e-3 |numeric|.

#include <cmath>
#include <string>

#include <catch2/catch.hpp>
#include <moe/config.hpp>
#include <moe/parameter.hpp>
#include <moe/random.hpp>

namespace moe::test {

struct GradCheckStats {
  Index checked = 0;
  double max_abs_numeric = 0;  // guards against a vacuous check where every gradient is 0
  double max_abs_error = 0;    // largest |analytic - numeric| seen
};

/// Compares `analytic[i]` with the central difference of `loss()` w.r.t. `values[i]` for `max_checks`
/// indices drawn from [0, n) (all of them when n <= max_checks). `values` is restored after each probe.
template <class Values, class Loss>
GradCheckStats check_gradient(const std::string& name, Values&& values, const double* analytic, Index n, Loss&& loss,
                              Index max_checks = 64, std::uint64_t seed = 1) {
  constexpr double h = 1e-6;
  Rng rng(seed);
  GradCheckStats stats;
  const bool all = n <= max_checks;
  for (Index c = 0; c < (all ? n : max_checks); ++c) {
    const Index i = all ? c : rng.below(n);
    const double saved = values[i];
    values[i] = saved + h;
    const double up = loss();
    values[i] = saved - h;
    const double down = loss();
    values[i] = saved;
    const double numeric = (up - down) / (2 * h);
    INFO(name << "[" << i << "]: analytic " << analytic[i] << ", numeric " << numeric);
    REQUIRE(std::abs(analytic[i] - numeric) <= 1e-5 + 1e-3 * std::abs(numeric));
    ++stats.checked;
    stats.max_abs_numeric = std::max(stats.max_abs_numeric, std::abs(numeric));
    stats.max_abs_error = std::max(stats.max_abs_error, std::abs(analytic[i] - numeric));
  }
  return stats;
}

/// The same for every element of a parameter: each probe writes through Parameter::data(), so a bank that
/// caches packed weights sees every change.
template <class Loss>
GradCheckStats check_gradient(const std::string& name, Parameter<double>& p, Loss&& loss, Index max_checks = 64,
                              std::uint64_t seed = 1) {
  const auto g = p.grad();
  struct Probe {
    Parameter<double>& p;
    double& operator[](Index i) { return p.data()[i]; }
  };
  Probe values{p};
  return check_gradient(name, values, g.data(), p.rows() * p.cols(), loss, max_checks, seed);
}

}  // namespace moe::test
