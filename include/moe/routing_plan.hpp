#pragma once
/// @file routing_plan.hpp
/// @brief The dispatch plan: a counting sort of (token, slot) pairs by expert, as ggml's mul_mat_id does.
///
/// Rows of the grouped matrix are ordered by expert, then by token, then by slot (a stable sort), so
/// expert e owns grouped rows [offsets[e], offsets[e+1]). `slot_row` maps each (token, slot) back to its
/// grouped row; the combine step reads it in slot order, which keeps results independent of threads.

#include <algorithm>
#include <span>

#include "config.hpp"
#include "workspace.hpp"

namespace moe {

/// Views into a Workspace; valid until the next forward that uses the same Workspace.
struct RoutingPlan {
  Index n_tokens = 0;
  Index top_k = 0;
  Index n_experts = 0;
  Index* counts = nullptr;      ///< (n_experts,) rows routed to each expert
  Index* offsets = nullptr;     ///< (n_experts + 1,) first grouped row of each expert; offsets[E] = rows
  Index* row_token = nullptr;   ///< (n_tokens * top_k,) token of each grouped row
  Index* slot_row = nullptr;    ///< (n_tokens, top_k) grouped row of each slot, -1 when the slot is dropped

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
  }
};

}  // namespace moe
