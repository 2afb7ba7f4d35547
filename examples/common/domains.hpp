#pragma once
// The synthetic "domain" data of PAPERS.md D (shared by the balance experiments): D domains, each with a mean
// vector μ_d and its own random nonlinear target y = tanh(x U_d) V_d; a sequence is `length` tokens of one
// domain, x = μ_d + N(0, I). A linear router can tell the domains apart (the means), and an expert that
// serves one domain has one function to fit instead of several: the data reward domain specialisation.

#include <cmath>
#include <span>
#include <vector>

#include <moe/moe.hpp>

namespace moe::examples {

struct DomainTask {
  std::vector<RowMatrix<double>> mean;  // per domain (1, d_model): μ_d
  std::vector<RowMatrix<double>> u;     // per domain (d_model, hidden)
  std::vector<RowMatrix<double>> v;     // per domain (hidden, d_model)
};

/// D domains with |μ_d| ≈ mean_norm; U entries N(0, 1/d_model) (tanh inputs of variance about 1 + mean_norm²/d_model:
/// its nonlinear range), V entries N(0, target_scale²/hidden) (targets of variance about 0.4 target_scale²: the
/// scale of the task loss against a balance loss's fixed coefficient).
inline DomainTask make_domain_task(int n_domains, Index d_model, Index hidden, double mean_norm, double target_scale,
                                   std::uint64_t seed) {
  Rng rng(seed);
  const auto fill = [&](Index rows, Index cols, double std) {
    RowMatrix<double> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = std * rng.normal();
    return m;
  };
  DomainTask task;
  for (int d = 0; d < n_domains; ++d) {
    task.mean.push_back(fill(1, d_model, mean_norm / std::sqrt(double(d_model))));
    task.u.push_back(fill(d_model, hidden, 1.0 / std::sqrt(double(d_model))));
    task.v.push_back(fill(hidden, d_model, target_scale / std::sqrt(double(hidden))));
  }
  return task;
}

/// A batch of sequences: x and target (n_sequences · length, d_model), the domain of every token.
struct DomainBatch {
  RowMatrix<double> x;
  RowMatrix<double> target;
  std::vector<int> domain;  // (n_tokens)
};

/// One sequence of `length` tokens per entry of `domains`, in that order.
inline DomainBatch sample_sequences(const DomainTask& task, std::span<const int> domains, Index length, Rng& rng) {
  const Index d_model = task.mean[0].cols(), n = static_cast<Index>(domains.size()) * length;
  DomainBatch b{RowMatrix<double>(n, d_model), RowMatrix<double>(n, d_model), {}};
  for (Index t = 0; t < n; ++t) {
    const auto d = static_cast<std::size_t>(domains[static_cast<std::size_t>(t / length)]);
    for (Index j = 0; j < d_model; ++j) b.x(t, j) = task.mean[d](0, j) + rng.normal();
    b.target.row(t) = (b.x.row(t) * task.u[d]).array().tanh().matrix() * task.v[d];
    b.domain.push_back(static_cast<int>(d));
  }
  return b;
}

/// A domain drawn with probabilities proportional to `weights`.
inline int draw_domain(std::span<const double> weights, Rng& rng) {
  double total = 0;
  for (double w : weights) total += w;
  double u = rng.uniform() * total;
  for (std::size_t d = 0; d + 1 < weights.size(); ++d)
    if ((u -= weights[d]) < 0) return static_cast<int>(d);
  return static_cast<int>(weights.size()) - 1;
}

}  // namespace moe::examples
