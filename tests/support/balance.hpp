#pragma once
// A BalanceBatch that owns its arrays, for the loss-policy tests: probabilities as given (or a softmax of
// logits), chosen columns as given, and the loss evaluated with fresh dp/dz buffers.

#include <algorithm>
#include <cmath>
#include <vector>

#include <moe/losses/balance_batch.hpp>
#include <moe/workspace.hpp>

namespace moe::test {

struct OwnedBatch {
  OwnedBatch(Index n, Index w, Index k) : n_tokens(n), width(w), slots(k) {}
  Index n_tokens, width, slots;
  std::vector<double> z, p;
  std::vector<Index> cols;
  std::vector<std::uint8_t> zero_computation;  // empty: none
  std::vector<Index> sequence_of_token;        // empty: one sequence
  bool training = true;
  moe::GlobalBatchCounts* global_batch = nullptr;  // the global-batch counts a forward reads and advances
  Index n_null = 0;                                // AdaMoE null columns, the last ones

  /// p = softmax of each row of z.
  void softmax_from_logits() {
    p.assign(z.size(), 0.0);
    for (Index t = 0; t < n_tokens; ++t) {
      const double* zr = z.data() + t * width;
      const double m = *std::max_element(zr, zr + width);
      double s = 0;
      for (Index c = 0; c < width; ++c) s += std::exp(zr[c] - m);
      for (Index c = 0; c < width; ++c) p[static_cast<std::size_t>(t * width + c)] = std::exp(zr[c] - m) / s;
    }
  }
  losses::BalanceBatch<double> view() const {
    return {n_tokens,
            width,
            slots,
            z.empty() ? nullptr : z.data(),
            p.data(),
            cols.data(),
            zero_computation,
            training,
            sequence_of_token.empty() ? nullptr : sequence_of_token.data(),
            global_batch,
            n_null};
  }
};

/// Value of `loss` on `b`; dp and dz (resized, zeroed) receive its gradients. Scratch from a measured Workspace.
template <class L>
double evaluate(const L& loss, const OwnedBatch& b, std::vector<double>& dp, std::vector<double>& dz) {
  dp.assign(static_cast<std::size_t>(b.n_tokens * b.width), 0.0);
  dz.assign(dp.size(), 0.0);
  Arena measure;
  loss.forward(b.view(), dp.data(), dz.data(), measure);
  Workspace ws(measure.peak());
  Arena arena(ws);
  return loss.forward(b.view(), dp.data(), dz.data(), arena);
}

}  // namespace moe::test
