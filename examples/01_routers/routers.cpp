// 01_routers: what each router of moe::routers chooses for one batch.
//
// Teaches: building every router (TopKRouter presets, capacity limits, null experts, the dense-to-sparse
// gate, expert choice, MoE++ gating residuals) and reading its (expert id, weight) slots; id -1 is a slot that
// runs nothing. (Pre-gating is a moe::Stack option: docs/routers.md.)
// Usage: routers            (prints one table per router; exits non-zero if a routing breaks its invariants)

#include <cmath>
#include <cstdio>

#include <moe/moe.hpp>

namespace {

constexpr moe::Index k_tokens = 6, k_d_model = 16, k_experts = 8;

// Routes x with `router` (and the previous layer's logits, for a gating residual), prints (id:weight) per
// token, and checks ids in range and weights finite.
template <class R>
bool show(const char* name, const R& router, const moe::RowMatrix<float>& x,
          moe::ConstMatrixView<float> previous_logits = {}) {
  const moe::Index k = router.top_k();
  const moe::RouteInput<float> in{.x = x, .previous_logits = previous_logits};
  moe::Arena measure;  // sizes the workspace: the output (ids, weights, what backward would need), then scratch
  auto sizing = moe::carve_route_output(router, measure, k_tokens);
  router.route(in, sizing, measure);
  moe::Workspace ws(measure.peak());
  moe::Arena arena(ws);
  auto out = moe::carve_route_output(router, arena, k_tokens);
  router.route(in, out, arena);

  std::printf("%s\n", name);
  bool ok = true;
  for (moe::Index t = 0; t < k_tokens; ++t) {
    std::printf("  token %td:", t);
    for (moe::Index s = 0; s < k; ++s) {
      const moe::Index e = out.ids[t * k + s];
      const float w = out.weights[t * k + s];
      if (e >= 0) std::printf(" %td:%.3f", e, static_cast<double>(w));
      ok = ok && e >= -1 && e < router.n_experts() && std::isfinite(w) && (e >= 0 || w == 0.0f);
    }
    std::printf("\n");
  }
  return ok;
}

}  // namespace

int main() {
  namespace r = moe::routers;
  const moe::MoEConfig shape{.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = 2};
  moe::Rng rng(2024);
  moe::RowMatrix<float> x(k_tokens, k_d_model);
  for (moe::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());

  // Every router is initialised from the same seed, so they share the gate W_g (the first rows of it).
  const auto make = [&](auto router) {
    moe::Rng init(7);
    router.init(init);
    return router;
  };
  bool ok = true;
  ok &= show("Mixtral (softmax, top-2, renormalised)", make(r::TopKRouter<float>(shape, r::presets::mixtral())), x);
  ok &= show("Switch (top-1, weight p)",
             make(r::TopKRouter<float>({.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = 1},
                                       r::presets::switch_transformer())),
             x);
  ok &= show("Qwen2-MoE (top-4, not renormalised)",
             make(r::TopKRouter<float>({.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = 4},
                                       r::presets::qwen2_moe())),
             x);
  auto v3 = r::presets::deepseek_v3();  // 8 groups of 1 expert here: keep 4 groups, score = the expert
  v3.group_score_top = 1;
  ok &= show("DeepSeek-V3 form (sigmoid, groups, renormalised x 2.5)", make(r::TopKRouter<float>(shape, v3)), x);
  ok &= show("Mixtral with capacity factor 1 (dropped slots are gone)",
             r::CapacityLimited<r::TopKRouter<float>>(make(r::TopKRouter<float>(shape)), {.capacity_factor = 1.0}), x);
  ok &= show("AdaMoE (8 true + 8 null experts, top-3)",
             make(r::NullExpertRouter<float>({.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = 3},
                                             {.n_null_experts = 8})),
             x);
  ok &= show("EvoMoE dense-to-sparse gate, step 0 (tau = 1)",
             make(r::DenseToSparseGate<float>({.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = k_experts},
                                              {.decay_steps = 100})),
             x);
  auto late = make(r::DenseToSparseGate<float>({.d_model = k_d_model, .d_ff = 1, .n_experts = k_experts, .top_k = k_experts},
                                               {.min_temperature = 0.1, .decay_steps = 100}));
  late.set_step(100);
  ok &= show("EvoMoE dense-to-sparse gate, step 100 (tau = 0.1)", late, x);
  ok &= show("Expert choice (capacity factor 2: each expert takes 2 of the 6 tokens)",
             make(r::ExpertChoiceRouter<float>(shape, {.capacity_factor = 2.0})), x);
  // MoE++ gating residual: the previous layer's raw logits (here: random ones), mapped by gate_map, are added.
  auto residual = make(r::GatingResidual<r::TopKRouter<float>>(r::TopKRouter<float>(shape)));
  moe::RowMatrix<float> previous_logits(k_tokens, k_experts);
  for (moe::Index i = 0; i < previous_logits.size(); ++i) previous_logits.data()[i] = static_cast<float>(3.0 * rng.normal());
  ok &= show("Mixtral + MoE++ gating residual (previous layer's logits added through gate_map)", residual, x,
             previous_logits);
  if (!ok) std::printf("FAILED: a router broke its invariants\n");
  return ok ? 0 : 1;
}
