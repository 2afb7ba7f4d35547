#pragma once
/// @file losses/balance_batch.hpp
/// @brief What a loss policy sees of one routed batch (BalanceBatch) and the slot counts every balance loss
/// starts from. Loss policies (losses/*.hpp) are attached to a router with routers::WithLosses.
///
/// A loss policy L provides `double forward(const BalanceBatch<T>&, T* dp, T* dz, Arena&)`: it returns its
/// value (coefficient included) and ADDS dL/dp (n_tokens, width) to dp and dL/dz to dz; and `validate()`,
/// which throws moe::Error naming a bad knob (routers::WithLosses calls it when it is built). The slot fractions f
/// are constants of the forward (piecewise constant in the logits), so a balance loss's gradient flows
/// through the probabilities p only (PAPERS.md C.1).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "../config.hpp"
#include "../error.hpp"
#include "../route_io.hpp"
#include "../workspace.hpp"

namespace moe::losses {

/// One routed batch, as the loss policies see it. The "columns" are what the router balances over: its
/// experts, plus AdaMoE's null experts.
template <class T>
struct BalanceBatch {
  Index n_tokens = 0;
  Index width = 0;                     ///< columns (E, or n + m with null experts)
  Index slots = 0;                     ///< slots per token (top_k)
  const T* z = nullptr;                ///< (n_tokens, width) raw router logits
  const T* p = nullptr;                ///< (n_tokens, width) routing probabilities (each row sums to 1)
  const Index* cols = nullptr;         ///< (n_tokens, slots) chosen column of each slot, -1 for none
  /// 1 for MoE++ zero-computation columns, over the first size() columns (the experts; AdaMoE's null columns
  /// after them are ordinary); empty: none.
  std::span<const std::uint8_t> zero_computation;
  bool training = false;               ///< a training forward (stateful losses advance)
  const Index* sequence_of_token = nullptr;  ///< (n_tokens) sequence of each token; nullptr: one sequence
  GlobalBatchCounts* global_batch = nullptr;  ///< the caller's global-batch counts, or nullptr: none
  Index n_null = 0;                           ///< AdaMoE's null experts: the last n_null columns (0: none)
};

/// counts[c] += slots of tokens [t0, t1) choosing column c (in token order: the sum is exact in double).
template <class T>
void count_columns(const BalanceBatch<T>& b, Index t0, Index t1, double* counts) {
  for (Index i = t0 * b.slots; i < t1 * b.slots; ++i)
    if (b.cols[i] >= 0) counts[b.cols[i]] += 1.0;
}

/// The scratch every Switch-form loss starts from, 2 · width doubles from `arena`: `counts` holding each column's
/// slots over the whole batch (count_columns) and `scratch` for switch_form. Both nullptr while the arena measures
/// or for an empty batch, where a loss is 0.
struct ColumnCounts {
  double* counts = nullptr;
  double* scratch = nullptr;
};
template <class T>
ColumnCounts column_counts(const BalanceBatch<T>& b, Arena& arena) {
  ColumnCounts c{arena.take<double>(b.width), arena.take<double>(b.width)};
  if (arena.measuring() || b.n_tokens == 0) return {};
  std::fill_n(c.counts, b.width, 0.0);
  count_columns(b, 0, b.n_tokens, c.counts);
  return c;
}

/// mean[c] = mean over tokens [t0, t1) of p[t, c], summed in token order (deterministic).
template <class T>
void mean_probabilities(const BalanceBatch<T>& b, Index t0, Index t1, double* mean) {
  std::fill_n(mean, b.width, 0.0);
  for (Index t = t0; t < t1; ++t)
    for (Index c = 0; c < b.width; ++c) mean[c] += double(b.p[t * b.width + c]);
  for (Index c = 0; c < b.width; ++c) mean[c] /= double(t1 - t0);
}

/// The Switch form over tokens [t0, t1) with slot fractions f (Σf = 1): value = scale · Σ_c η_c f_c P_c, and
/// dp[t, c] += scale · η_c f_c / (t1 - t0), where η_c = tau for zero-computation columns and 1 otherwise.
template <class T>
double switch_form(const BalanceBatch<T>& b, Index t0, Index t1, const double* f, double scale, double tau,
                   double* scratch, T* dp) {
  mean_probabilities(b, t0, t1, scratch);
  double value = 0;
  for (Index c = 0; c < b.width; ++c) {
    const bool zero =
        static_cast<std::size_t>(c) < b.zero_computation.size() && b.zero_computation[static_cast<std::size_t>(c)];
    const double eta = zero ? tau : 1.0;
    value += eta * f[c] * scratch[c];
    scratch[c] = scale * eta * f[c] / double(t1 - t0);  // now dL/dp[t, c]
  }
  for (Index t = t0; t < t1; ++t)
    for (Index c = 0; c < b.width; ++c) dp[t * b.width + c] += static_cast<T>(scratch[c]);
  return scale * value;
}

/// Divides counts by their sum (f with Σf = 1); all zero stays zero.
inline void to_fractions(double* counts, Index n) {
  double total = 0;
  for (Index c = 0; c < n; ++c) total += counts[c];
  if (total > 0)
    for (Index c = 0; c < n; ++c) counts[c] /= total;
}

}  // namespace moe::losses
