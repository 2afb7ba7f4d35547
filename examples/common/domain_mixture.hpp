#pragma once
// The synthetic "domain" generator of PAPERS.md D (shared by D.1-D.3, D.8): D domains, each with a mean
// vector mu_d and its own target maps. A sequence is `seq_len` tokens from one domain, x = mu_d + N(0, I).
// A difficulty knob makes a share of tokens easy (a linear target) and the rest hard (a nonlinear target):
//   easy: target = x + x A_d            hard: target = x + tanh(x U_d) V_d
// The last input coordinate carries the difficulty (+k_difficulty_flag hard, -k_difficulty_flag easy, plus
// the noise), so which target applies can be learned from x rather than being irreducible noise.
// The residual "x +" is what an MoE stack (h_{l+1} = h_l + MoE_l(h_l)) gets for free; the experts learn the
// rest. Batches are drawn fresh from an Rng, so training never sees the same batch twice.

#include <cmath>
#include <vector>

#include <moe/moe.hpp>

namespace moe::examples {

struct DomainBatch {
  RowMatrix<float> x;        // (n_tokens, d_model)
  RowMatrix<float> target;   // (n_tokens, d_model)
  std::vector<int> domain;   // (n_tokens) domain of each token
  std::vector<int> hard;     // (n_tokens) 1 for a nonlinear-target token
};

class DomainMixture {
 public:
  static constexpr float k_difficulty_flag = 2.0f;

  /// @param mean_scale size of each domain mean's entries next to the unit noise (how separable domains are)
  DomainMixture(Index d_model, int n_domains, std::uint64_t seed, double mean_scale = 1.0)
      : d_(d_model), n_domains_(n_domains) {
    Rng rng(seed);
    const auto normal = [&](Index rows, Index cols, double scale) {
      RowMatrix<float> m(rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * rng.normal());
      return m;
    };
    const double s = 1.0 / std::sqrt(double(d_model));
    for (int k = 0; k < n_domains; ++k) {
      mean_.push_back(normal(1, d_model, mean_scale));
      linear_.push_back(normal(d_model, d_model, 0.5 * s));
      u_.push_back(normal(d_model, d_model, 2.0 * s));
      v_.push_back(normal(d_model, d_model, s));
    }
  }

  Index d_model() const { return d_; }
  int n_domains() const { return n_domains_; }

  /// n_sequences sequences of seq_len tokens, each from a uniformly drawn domain; each token is easy with
  /// probability easy_fraction.
  DomainBatch sample(Index n_sequences, Index seq_len, double easy_fraction, Rng& rng) const {
    const Index n = n_sequences * seq_len;
    DomainBatch b{RowMatrix<float>(n, d_), RowMatrix<float>(n, d_), std::vector<int>(std::size_t(n)),
                  std::vector<int>(std::size_t(n))};
    for (Index s = 0; s < n_sequences; ++s) {
      const int k = static_cast<int>(rng.next() % std::uint64_t(n_domains_));
      const auto dk = std::size_t(k);
      for (Index t = s * seq_len; t < (s + 1) * seq_len; ++t) {
        for (Index j = 0; j < d_; ++j) b.x(t, j) = mean_[dk](0, j) + static_cast<float>(rng.normal());
        const bool hard = rng.uniform() >= easy_fraction;
        b.x(t, d_ - 1) = (hard ? k_difficulty_flag : -k_difficulty_flag) + static_cast<float>(rng.normal());
        b.domain[std::size_t(t)] = k;
        b.hard[std::size_t(t)] = hard ? 1 : 0;
        const auto x = b.x.row(t);
        if (hard) {
          b.target.row(t) = x + (x * u_[dk]).array().tanh().matrix() * v_[dk];
        } else {
          b.target.row(t) = x + x * linear_[dk];
        }
      }
    }
    return b;
  }

 private:
  Index d_;
  int n_domains_;
  std::vector<RowMatrix<float>> mean_;    // (1, d_model) each
  std::vector<RowMatrix<float>> linear_;  // A_d (d_model, d_model)
  std::vector<RowMatrix<float>> u_, v_;   // U_d, V_d (d_model, d_model)
};

/// Mean squared error of y against target and its gradient 2 (y - target) / size, written to dy.
inline double mse(const RowMatrix<float>& y, const RowMatrix<float>& target, RowMatrix<float>& dy) {
  dy = y - target;
  const double loss = double(dy.squaredNorm()) / double(dy.size());
  dy *= 2.0f / float(dy.size());
  return loss;
}

}  // namespace moe::examples
