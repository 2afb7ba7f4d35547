#pragma once
// Synthetic mixture-of-regimes regression, shared by examples/02_training and tests/integration: each token
// x ~ N(0, I) belongs to the regime r = argmax(x_0 .. x_{R-1}) (a region a linear router can learn), and its
// target is x A_r with one random linear map A_r per regime. A single FFN must fit R different maps; an MoE
// with one expert per regime only needs to route.

#include <vector>

#include <moe/moe.hpp>

#include "loss.hpp"

namespace moe::examples {

struct Regimes {
  RowMatrix<double> x;       // (n_tokens, d_model)
  RowMatrix<double> target;  // (n_tokens, d_model)
  std::vector<int> regime;   // (n_tokens) label of each token
};

inline Regimes make_regimes(Index n_tokens, Index d_model, int n_regimes, std::uint64_t seed) {
  Rng rng(seed);
  Regimes data{RowMatrix<double>(n_tokens, d_model), RowMatrix<double>(n_tokens, d_model),
               std::vector<int>(static_cast<std::size_t>(n_tokens))};
  for (Index i = 0; i < data.x.size(); ++i) data.x.data()[i] = rng.normal();
  std::vector<RowMatrix<double>> maps;
  for (int r = 0; r < n_regimes; ++r) {
    RowMatrix<double> a(d_model, d_model);
    for (Index i = 0; i < a.size(); ++i) a.data()[i] = rng.normal();
    maps.push_back(a);
  }
  for (Index t = 0; t < n_tokens; ++t) {
    int r = 0;
    for (int j = 1; j < n_regimes; ++j)
      if (data.x(t, j) > data.x(t, r)) r = j;
    data.regime[static_cast<std::size_t>(t)] = r;
    data.target.row(t) = data.x.row(t) * maps[static_cast<std::size_t>(r)];
  }
  return data;
}

}  // namespace moe::examples
