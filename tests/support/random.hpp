#pragma once
// Seeded test data on top of moe::Rng (fixed seed per call site: every failure is reproducible).

#include <vector>

#include <moe/random.hpp>

namespace moe::test {

using Rng = moe::Rng;

/// `n` values drawn from N(0, scale^2), converted to T.
template <class T>
std::vector<T> normal_vector(Rng& rng, Index n, double scale = 1.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(scale * rng.normal());
  return v;
}

/// A (rows, cols) row-major matrix drawn from N(0, scale^2).
template <class T>
RowMatrix<T> normal_matrix(Rng& rng, Index rows, Index cols, double scale = 1.0) {
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(scale * rng.normal());
  return m;
}

}  // namespace moe::test
