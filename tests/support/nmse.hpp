#pragma once
// Comparison metrics of the test plan (RELIABILITY.md): NMSE = mse(a, b) / mse(a, 0) as in ggml's
// test-backend-ops, and the gamma_n forward-error constant of an n-term sum.

#include <cmath>
#include <cstddef>
#include <limits>

namespace moe::test {

/// Normalised mean squared error of `got` against the reference `ref` (both length n).
template <class A, class B>
double nmse(const A* ref, const B* got, std::size_t n) {
  double err = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double r = static_cast<double>(ref[i]), d = static_cast<double>(got[i]) - r;
    err += d * d;
    norm += r * r;
  }
  return norm == 0.0 ? (err == 0.0 ? 0.0 : std::numeric_limits<double>::infinity()) : err / norm;
}

/// gamma_n = n u / (1 - n u) for unit roundoff u of T: a bound for any summation order of n terms.
template <class T>
double gamma_n(double n) {
  const double u = std::numeric_limits<T>::epsilon() / 2.0;
  return n * u / (1.0 - n * u);
}

}  // namespace moe::test
