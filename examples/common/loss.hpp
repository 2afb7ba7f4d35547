#pragma once
// The task loss of the examples: every synthetic task here (regimes.hpp, domains.hpp) is a regression. One
// template serves float and double layers; the loss comes back as double, the type of the CSVs and RESULT lines.

#include <moe/moe.hpp>

namespace moe::examples {

/// Mean squared error of y against target; writes its gradient 2 (y - target) / size to dy.
template <class T>
double mse(const RowMatrix<T>& y, const RowMatrix<T>& target, RowMatrix<T>& dy) {
  dy = y - target;
  const double loss = double(dy.squaredNorm()) / double(dy.size());
  dy *= T(2) / T(dy.size());
  return loss;
}

}  // namespace moe::examples
