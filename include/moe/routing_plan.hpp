#pragma once
/// @file routing_plan.hpp
/// @brief The dispatch plan: a counting sort of (token, slot) pairs by expert, as ggml's mul_mat_id does,
/// and the plan-level helpers (slots in use per token, carried-state links of recurrent banks).
///
/// Rows of the grouped matrix are ordered by expert, then by token, then by slot (a stable sort), so
/// expert e owns grouped rows [offsets[e], offsets[e+1]). `slot_row` maps each (token, slot) back to its
/// grouped row; the combine step reads it in slot order, which keeps results independent of threads.

#include <algorithm>
#include <span>

#include "config.hpp"
#include "workspace.hpp"

namespace moe {

/// Counts, per token, the slots in use (id >= 0): the true experts a token runs (null experts, dense-to-sparse
/// and expert-choice routing, dropped slots all leave ids of -1).
/// @param ids (n_tokens, slots) expert ids; @param counts (n_tokens,) output
inline void count_active_slots(const Index* ids, Index n_tokens, Index slots, Index* counts) {
  for (Index t = 0; t < n_tokens; ++t)
    counts[t] = static_cast<Index>(std::count_if(ids + t * slots, ids + (t + 1) * slots, [](Index e) { return e >= 0; }));
}

/// Carried-state links of grouped rows (recurrent banks, experts::GRU): row r's previous state is the row just
/// before it in the same expert when both rows' tokens belong to one sequence, else none (-1). Rows of an
/// expert are in token order (the plan is a stable sort), so this links each sequence's tokens routed to the
/// expert in order.
/// @param offsets           (n_experts + 1) grouped-row offsets of the experts
/// @param n_experts         experts
/// @param row_token         (rows) token of each grouped row (RoutingPlan::row_token)
/// @param sequence_of_token (n_tokens) sequence id of each token; each sequence is a contiguous range of
///                          tokens in time order (a packed batch, as cu_seqlens describes)
/// @param prev_rows         (rows) output, written for the rows [offsets[0], offsets[n_experts])
inline void carried_state_rows(const Index* offsets, Index n_experts, const Index* row_token,
                               const Index* sequence_of_token, Index* prev_rows) {
  for (Index e = 0; e < n_experts; ++e) {
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      const bool same = r > offsets[e] && sequence_of_token[row_token[r - 1]] == sequence_of_token[row_token[r]];
      prev_rows[r] = same ? r - 1 : -1;
    }
  }
}

/// Views into a Workspace; valid until the next forward that uses the same Workspace.
struct RoutingPlan {
  Index n_tokens = 0;
  Index top_k = 0;
  Index n_experts = 0;
  Index* counts = nullptr;      ///< (n_experts,) rows routed to each expert
  Index* offsets = nullptr;     ///< (n_experts + 1,) first grouped row of each expert; offsets[E] = rows
  Index* row_token = nullptr;   ///< (n_tokens * top_k,) token of each grouped row
  Index* slot_row = nullptr;    ///< (n_tokens, top_k) grouped row of each slot, -1 when the slot is dropped
  Index* experts_per_token = nullptr;  ///< (n_tokens,) slots of each token that reached an expert

  Index n_rows() const { return offsets[n_experts]; }  ///< grouped rows in use (slots not dropped)

  /// Carves the plan's arrays from `arena` (or measures them).
  static RoutingPlan carve(Arena& arena, Index n_tokens, Index top_k, Index n_experts) {
    RoutingPlan p;
    p.n_tokens = n_tokens;
    p.top_k = top_k;
    p.n_experts = n_experts;
    p.counts = arena.take<Index>(n_experts);
    p.offsets = arena.take<Index>(n_experts + 1);
    p.row_token = arena.take<Index>(n_tokens * top_k);
    p.slot_row = arena.take<Index>(n_tokens * top_k);
    p.experts_per_token = arena.take<Index>(n_tokens);
    return p;
  }

  /// Builds the plan from the router's choice `ids` (n_tokens, top_k). An id < 0 marks a dropped slot.
  /// Ids must be < n_experts (routers guarantee it; checked here because an out-of-range id would
  /// write out of bounds).
  void build(const Index* ids) {
    std::fill(counts, counts + n_experts, Index{0});
    const Index n_slots = n_tokens * top_k;
    for (Index i = 0; i < n_slots; ++i) {
      const Index e = ids[i];
      detail::require(e < n_experts, "moe::RoutingPlan: expert id ", e, " out of range [0, ", n_experts, ")");
      if (e >= 0) ++counts[e];
    }
    offsets[0] = 0;
    for (Index e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    // Second pass in (token, slot) order: a stable counting sort. counts[] doubles as the fill cursor
    // and is restored afterwards.
    std::fill(counts, counts + n_experts, Index{0});
    for (Index i = 0; i < n_slots; ++i) {
      const Index e = ids[i];
      if (e < 0) {
        slot_row[i] = -1;
        continue;
      }
      const Index row = offsets[e] + counts[e]++;
      row_token[row] = i / top_k;
      slot_row[i] = row;
    }
    count_active_slots(ids, n_tokens, top_k, experts_per_token);
  }

  /// Writes the carried-state links of every grouped row of the built plan (carried_state_rows over all
  /// experts) into prev_rows (n_rows()).
  void link_sequences(const Index* sequence_of_token, Index* prev_rows) const {
    carried_state_rows(offsets, n_experts, row_token, sequence_of_token, prev_rows);
  }
};

}  // namespace moe
