#pragma once
// The synthetic "domain" data of PAPERS.md D, one generator for every paper experiment. D domains, each with a
// mean μ_d and its own target maps; a sequence is `length` tokens of one domain, x = μ_d + N(0, I). A linear
// router can tell the domains apart (the means), and an expert that serves one domain has one function to fit
// instead of several: the data reward domain specialisation. Options add what single experiments need:
//   - easy/hard tokens (adaptive compute): easy tokens have a linear target x A_d, hard ones tanh(x U_d) V_d;
//     difficulty_shift moves x's last coordinate to ±shift (hard +, easy -; μ_d is 0 there), so a router can
//     see the difficulty instead of meeting it as irreducible noise;
//   - residual: target += x, what a layer inside a residual stack h + MoE(h) has to learn on top of h;
//   - domain_weights: skewed domain frequencies (balance under an uneven mix).
// Parameters are drawn in double from one seed; batches are drawn fresh from the caller's Rng.

#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include <moe/moe.hpp>

namespace moe::examples {

struct DomainOptions {
  int n_domains = 4;
  Index d_model = 16;
  Index hidden = 32;          // width of the tanh map of hard targets
  double mean_norm = 4.0;     // |μ_d| ≈ mean_norm: how far apart the domains lie next to the unit noise
  double tanh_gain = 1.0;     // U_d ~ N(0, gain²/d_model): tanh inputs of variance ≈ gain²(1 + mean_norm²/d_model)
  double target_scale = 1.0;  // V_d ~ N(0, scale²/hidden): hard targets of std ≈ 0.6 scale (gain 1), the task
                              // loss's weight against the fixed coefficients of balance losses
  double linear_scale = 0.5;  // A_d ~ N(0, scale²/d_model), the easy targets' map
  double easy_fraction = 0;   // share of tokens with the linear target
  double difficulty_shift = 0;
  bool residual = false;
  std::vector<double> domain_weights = {};  // a sequence's domain ∝ these; empty: uniform
};

/// Tokens in sequence order: x and target (n_tokens, d_model), each token's domain and difficulty.
template <class T>
struct DomainBatch {
  RowMatrix<T> x;
  RowMatrix<T> target;
  std::vector<int> domain;
  std::vector<int> hard;  // 1: the nonlinear target
};

template <class T>
class DomainGenerator {
 public:
  DomainGenerator(DomainOptions options, std::uint64_t seed) : o_(std::move(options)) {
    Rng rng(seed);
    const auto normal = [&](Index rows, Index cols, double std) {
      RowMatrix<double> m(rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = std * rng.normal();
      return m;
    };
    const double d = double(o_.d_model);
    for (int k = 0; k < o_.n_domains; ++k) {
      mean_.push_back(normal(1, o_.d_model, o_.mean_norm / std::sqrt(d)));
      if (o_.difficulty_shift != 0) mean_.back()(0, o_.d_model - 1) = 0;
      linear_.push_back(normal(o_.d_model, o_.d_model, o_.linear_scale / std::sqrt(d)));
      u_.push_back(normal(o_.d_model, o_.hidden, o_.tanh_gain / std::sqrt(d)));
      v_.push_back(normal(o_.hidden, o_.d_model, o_.target_scale / std::sqrt(double(o_.hidden))));
    }
  }

  /// n_sequences sequences of `length` tokens, their domains drawn from domain_weights.
  DomainBatch<T> sample(Index n_sequences, Index length, Rng& rng) const {
    std::vector<int> domains;
    for (Index s = 0; s < n_sequences; ++s) domains.push_back(draw_domain(rng));
    return sample(domains, length, rng);
  }

  /// One sequence of `length` tokens per entry of `domains`, in that order.
  DomainBatch<T> sample(std::span<const int> domains, Index length, Rng& rng) const {
    const Index n = static_cast<Index>(domains.size()) * length, dm = o_.d_model;
    DomainBatch<T> b{RowMatrix<T>(n, dm), RowMatrix<T>(n, dm), {}, {}};
    RowMatrix<double> x(1, dm), y;
    for (Index t = 0; t < n; ++t) {
      const auto k = static_cast<std::size_t>(domains[static_cast<std::size_t>(t / length)]);
      for (Index j = 0; j < dm; ++j) x(0, j) = mean_[k](0, j) + rng.normal();
      const bool hard = rng.uniform() >= o_.easy_fraction;
      x(0, dm - 1) += hard ? o_.difficulty_shift : -o_.difficulty_shift;
      y = hard ? RowMatrix<double>((x * u_[k]).array().tanh().matrix() * v_[k]) : RowMatrix<double>(x * linear_[k]);
      if (o_.residual) y += x;
      b.x.row(t) = x.cast<T>();
      b.target.row(t) = y.cast<T>();
      b.domain.push_back(static_cast<int>(k));
      b.hard.push_back(hard);
    }
    return b;
  }

 private:
  int draw_domain(Rng& rng) const {
    if (o_.domain_weights.empty()) return static_cast<int>(rng.below(o_.n_domains));
    double total = 0;
    for (double w : o_.domain_weights) total += w;
    double u = rng.uniform() * total;
    for (std::size_t k = 0; k + 1 < o_.domain_weights.size(); ++k)
      if ((u -= o_.domain_weights[k]) < 0) return static_cast<int>(k);
    return static_cast<int>(o_.domain_weights.size()) - 1;
  }

  DomainOptions o_;
  std::vector<RowMatrix<double>> mean_;    // (1, d_model) each
  std::vector<RowMatrix<double>> linear_;  // A_d (d_model, d_model)
  std::vector<RowMatrix<double>> u_, v_;   // U_d (d_model, hidden), V_d (hidden, d_model)
};

}  // namespace moe::examples
