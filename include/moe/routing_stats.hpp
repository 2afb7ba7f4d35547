#pragma once
/// @file routing_stats.hpp
/// @brief RoutingStats: a sink for what the router did over many forwards (one per layer): tokens and
/// combine-weight mass per expert, experts per token split into real and zero-computation experts,
/// unused slots and the dropped ones among them, load entropy, MaxVio, coefficient of variation and per-group (e.g. per-domain)
/// counts; written as CSV for plotting.

#include <algorithm>
#include <cmath>
#include <map>
#include <ostream>
#include <span>
#include <vector>

#include "config.hpp"
#include "moe_layer.hpp"

namespace moe {

/// Accumulates routing statistics; record() after each forward, reset() to start over.
class RoutingStats {
 public:
  /// @param zero_computation per expert id, true for zero-computation experts (see MoELayer::zero_computation_mask)
  explicit RoutingStats(std::vector<bool> zero_computation)
      : zero_computation_(std::move(zero_computation)),
        tokens_(zero_computation_.size(), 0),
        mass_(zero_computation_.size(), 0.0) {
    detail::require(!zero_computation_.empty(), "moe::RoutingStats: needs at least one expert");
  }
  /// For a layer: takes its expert count and which experts are zero-computation.
  template <class Layer>
  explicit RoutingStats(const Layer& layer) : RoutingStats(layer.zero_computation_mask()) {}

  /// Adds one forward's routing. `groups`, if given, labels each token (n_tokens values, e.g. its domain).
  template <class T>
  void record(const ForwardResult<T>& r, std::span<const int> groups = {}) {
    const auto E = static_cast<Index>(tokens_.size());
    detail::require(groups.empty() || static_cast<Index>(groups.size()) == r.n_tokens,
                    "moe::RoutingStats::record: ", groups.size(), " group labels for ", r.n_tokens, " tokens");
    for (Index t = 0; t < r.n_tokens; ++t) {
      Index real = 0, zc = 0;
      std::vector<long>* group = groups.empty() ? nullptr : &group_tokens(groups[static_cast<std::size_t>(t)]);
      for (Index s = 0; s < r.top_k; ++s) {
        const auto i = static_cast<std::size_t>(t * r.top_k + s);
        const Index e = r.expert_ids[i];
        if (e < 0) {
          ++unused_slots_;
          continue;
        }
        detail::require(e < E, "moe::RoutingStats::record: expert id ", e, " but the stats know ", E, " experts");
        ++tokens_[static_cast<std::size_t>(e)];
        mass_[static_cast<std::size_t>(e)] += double(r.expert_weights[i]);
        if (group) ++(*group)[static_cast<std::size_t>(e)];
        ++(zero_computation_[static_cast<std::size_t>(e)] ? zc : real);
      }
      bump(real_per_token_, real);
      bump(zc_per_token_, zc);
    }
    n_tokens_ += r.n_tokens;
    dropped_slots_ += r.dropped_slots;
  }

  /// Forgets everything recorded.
  void reset() {
    std::fill(tokens_.begin(), tokens_.end(), 0);
    std::fill(mass_.begin(), mass_.end(), 0.0);
    real_per_token_.clear();
    zc_per_token_.clear();
    groups_.clear();
    n_tokens_ = unused_slots_ = dropped_slots_ = 0;
  }

  Index n_experts() const { return static_cast<Index>(tokens_.size()); }  ///< experts tracked
  long n_tokens() const { return n_tokens_; }                            ///< tokens recorded
  const std::vector<long>& tokens_per_expert() const { return tokens_; } ///< slots routed to each expert
  const std::vector<double>& weight_mass() const { return mass_; }       ///< sum of combine weights per expert
  long unused_slots() const { return unused_slots_; }  ///< slots with no expert (dropped, null, below threshold)
  long dropped_slots() const { return dropped_slots_; }  ///< of those, slots a capacity limit dropped
  /// histogram[n] = tokens that used n real (non-zero-computation) experts.
  const std::vector<long>& real_experts_per_token() const { return real_per_token_; }
  /// histogram[n] = tokens that used n zero-computation experts.
  const std::vector<long>& zero_computation_per_token() const { return zc_per_token_; }
  /// Tokens per expert for each group label seen.
  const std::map<int, std::vector<long>>& tokens_per_group() const { return groups_; }

  /// Mean number of real experts per token.
  double mean_real_experts_per_token() const { return mean(real_per_token_); }
  /// Load entropy over experts, normalised to [0, 1] (1 = perfectly even); 0 with one expert or no load.
  double load_entropy() const {
    const double total = total_load();
    if (total == 0 || tokens_.size() < 2) return 0;
    double h = 0;
    for (long c : tokens_)
      if (c > 0) h -= double(c) / total * std::log(double(c) / total);
    return h / std::log(double(tokens_.size()));
  }
  /// MaxVio (Wang et al., aux-loss-free balancing): max_i load_i / mean load - 1; 0 when perfectly even.
  double max_violation() const {
    const double m = total_load() / double(tokens_.size());
    return m == 0 ? 0 : double(*std::max_element(tokens_.begin(), tokens_.end())) / m - 1;
  }
  /// Standard deviation of the loads over their mean.
  double coefficient_of_variation() const {
    const double m = total_load() / double(tokens_.size());
    if (m == 0) return 0;
    double var = 0;
    for (long c : tokens_) var += (double(c) - m) * (double(c) - m);
    return std::sqrt(var / double(tokens_.size())) / m;
  }

  /// Specialisation of experts by group: the mutual information I(group; expert) of the routed slots recorded
  /// with group labels, divided by H(group); 0 when every group spreads like the whole, 1 when the expert
  /// determines the group. 0 with fewer than two groups.
  double group_specialization() const {
    double total = 0;
    std::vector<double> per_expert(tokens_.size(), 0.0);
    for (const auto& [label, counts] : groups_)
      for (std::size_t e = 0; e < counts.size(); ++e) {
        per_expert[e] += double(counts[e]);
        total += double(counts[e]);
      }
    double mi = 0, h_group = 0;
    for (const auto& [label, counts] : groups_) {
      double p_group = 0;
      for (long c : counts) p_group += double(c) / total;
      if (p_group > 0) h_group -= p_group * std::log(p_group);
      for (std::size_t e = 0; e < counts.size(); ++e)
        if (counts[e] > 0) {
          const double p = double(counts[e]) / total;
          mi += p * std::log(p / (p_group * per_expert[e] / total));
        }
    }
    return h_group > 0 ? mi / h_group : 0.0;
  }

  /// One row per expert: expert,zero_computation,tokens,weight_mass, then one column per group label
  /// (group_<label>). The summary metrics follow as comment lines starting with '#'.
  void write_csv(std::ostream& out) const {
    out << "expert,zero_computation,tokens,weight_mass";
    for (const auto& [label, counts] : groups_) out << ",group_" << label;
    out << '\n';
    for (std::size_t e = 0; e < tokens_.size(); ++e) {
      out << e << ',' << int(zero_computation_[e]) << ',' << tokens_[e] << ',' << mass_[e];
      for (const auto& [label, counts] : groups_) out << ',' << counts[e];
      out << '\n';
    }
    out << "# tokens=" << n_tokens_ << " unused_slots=" << unused_slots_ << " dropped_slots=" << dropped_slots_
        << " mean_real_experts_per_token=" << mean_real_experts_per_token() << " load_entropy=" << load_entropy()
        << " group_specialization=" << group_specialization()
        << " max_violation=" << max_violation() << " cv=" << coefficient_of_variation() << '\n';
  }

 private:
  static void bump(std::vector<long>& hist, Index n) {
    if (static_cast<Index>(hist.size()) <= n) hist.resize(static_cast<std::size_t>(n + 1), 0);
    ++hist[static_cast<std::size_t>(n)];
  }
  static double mean(const std::vector<long>& hist) {
    double n = 0, sum = 0;
    for (std::size_t i = 0; i < hist.size(); ++i) {
      n += double(hist[i]);
      sum += double(i) * double(hist[i]);
    }
    return n == 0 ? 0 : sum / n;
  }
  double total_load() const {
    double s = 0;
    for (long c : tokens_) s += double(c);
    return s;
  }
  std::vector<long>& group_tokens(int label) {
    return groups_.try_emplace(label, tokens_.size(), 0L).first->second;
  }

  std::vector<bool> zero_computation_;
  std::vector<long> tokens_;
  std::vector<double> mass_;
  std::vector<long> real_per_token_;
  std::vector<long> zc_per_token_;
  std::map<int, std::vector<long>> groups_;
  long n_tokens_ = 0;
  long unused_slots_ = 0;
  long dropped_slots_ = 0;
};

}  // namespace moe
