#pragma once
/// @file losses/z_loss.hpp
/// @brief The ST-MoE router z-loss (PAPERS.md A.6): keeps the router logits small.

#include <algorithm>
#include <cmath>

#include "balance_batch.hpp"

namespace moe::losses {

/// L = coeff · (1/T) Σ_t (log Σ_j exp z_tj)² over the raw logits z; dL/dz_tj = coeff · 2 lse_t / T · softmax(z_t)_j.
struct ZLoss {
  double coeff = 1e-3;  ///< c_z (ST-MoE: 1e-3); finite, >= 0

  /// Throws moe::Error unless coeff is finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::ZLoss", "coeff");
  }

  /// Value; adds dL/dz to dz.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* /*dp*/, T* dz, Arena& arena) const {
    validate();
    if (arena.measuring() || b.n_tokens == 0) return 0;
    double sum = 0;
    for (Index t = 0; t < b.n_tokens; ++t) {
      const T* z = b.z + t * b.width;
      const double m = double(*std::max_element(z, z + b.width));
      double s = 0;
      for (Index c = 0; c < b.width; ++c) s += std::exp(double(z[c]) - m);
      const double lse = m + std::log(s);
      sum += lse * lse;
      const double g = coeff * 2.0 * lse / double(b.n_tokens);
      for (Index c = 0; c < b.width; ++c) dz[t * b.width + c] += static_cast<T>(g * std::exp(double(z[c]) - lse));
    }
    return coeff * sum / double(b.n_tokens);
  }
};

}  // namespace moe::losses
