// routers::WithLosses through MoELayer: the values forward reports against plain-loop references, whole-layer
// gradients of task + aux loss against central finite differences in double (RELIABILITY G1) for Mixtral
// top-2 + Switch + z-loss, sigmoid scores + sequence loss over a packed batch, AdaMoE null experts balanced
// over n + m, a capacity limit, MoE++'s τ weighting, the global-batch buffer's life cycle, and bitwise
// thread-count determinism.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"
#include "support/routing.hpp"
#include "support/threads.hpp"

using moe::Index;
using moe::MoEConfig;
using moe::RowMatrix;
namespace losses = moe::losses;
namespace routers = moe::routers;
namespace experts = moe::experts;

namespace {

RowMatrix<double> tokens(Index n, Index d, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  return moe::test::normal_matrix<double>(rng, n, d);
}

// Softmax of x W_gᵀ in double, per token.
std::vector<std::vector<double>> probabilities(const RowMatrix<double>& x, moe::ConstMatrixView<double> gate) {
  std::vector<std::vector<double>> p;
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> z(static_cast<std::size_t>(gate.rows()));
    for (Index e = 0; e < gate.rows(); ++e)
      for (Index j = 0; j < x.cols(); ++j) z[static_cast<std::size_t>(e)] += x(t, j) * gate(e, j);
    const double m = *std::max_element(z.begin(), z.end());
    double s = 0;
    for (double& v : z) s += (v = std::exp(v - m));
    for (double& v : z) v /= s;
    p.push_back(z);
  }
  return p;
}

// The k columns of largest p, largest first.
std::vector<std::size_t> top_columns(const std::vector<double>& p, std::size_t k) {
  std::vector<std::size_t> order(p.size());
  for (std::size_t c = 0; c < p.size(); ++c) order[c] = c;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return p[a] > p[b]; });
  order.resize(k);
  return order;
}

// coeff · W · Σ_c η_c f_c P_c in plain loops: f from every token's chosen columns (Σf = 1), P the mean of p,
// η_c = eta[c] (1 when eta is empty).
double switch_reference(const std::vector<std::vector<double>>& p, const std::vector<std::vector<std::size_t>>& chosen,
                        double coeff, const std::vector<double>& eta = {}) {
  const std::size_t W = p[0].size();
  double slots = 0;
  for (const auto& c : chosen) slots += double(c.size());
  std::vector<double> f(W, 0.0), P(W, 0.0);
  for (std::size_t t = 0; t < p.size(); ++t) {
    for (std::size_t c : chosen[t]) f[c] += 1.0 / slots;
    for (std::size_t c = 0; c < W; ++c) P[c] += p[t][c] / double(p.size());
  }
  double value = 0;
  for (std::size_t c = 0; c < W; ++c) value += coeff * double(W) * (eta.empty() ? 1.0 : eta[c]) * f[c] * P[c];
  return value;
}

// Each token's chosen experts as reported by a forward (slots with id >= 0).
std::vector<std::vector<std::size_t>> chosen_ids(const moe::ForwardResult<double>& res) {
  std::vector<std::vector<std::size_t>> chosen(static_cast<std::size_t>(res.n_tokens));
  for (Index t = 0; t < res.n_tokens; ++t)
    for (Index s = 0; s < res.top_k; ++s)
      if (const Index e = res.expert_ids[static_cast<std::size_t>(t * res.top_k + s)]; e >= 0)
        chosen[static_cast<std::size_t>(t)].push_back(static_cast<std::size_t>(e));
  return chosen;
}

// Runs backward(r) of the training forward in ctx and checks d(<r, y> + aux)/d(x and every parameter)
// against finite differences; `forward(x, y)` is an inference forward returning the aux loss (default: the
// layer's). Returns the largest |numeric| seen (not vacuous).
template <class Layer>
double check_layer_gradients(Layer& layer, moe::TrainingContext<double>& ctx, RowMatrix<double>& x,
                             const RowMatrix<double>& r,
                             std::function<double(const RowMatrix<double>&, RowMatrix<double>&)> forward = {}) {
  if (!forward) forward = [&](const RowMatrix<double>& in, RowMatrix<double>& out) { return layer.forward(in, out).aux_loss; };
  RowMatrix<double> dx(x.rows(), x.cols());
  layer.zero_grad();
  layer.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(x.rows(), x.cols());
    const double aux = forward(x, out);
    return (out.array() * r.array()).sum() + aux;
  };
  double biggest = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss).max_abs_numeric;
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    biggest = std::max(biggest, moe::test::check_gradient(name, p, loss, 40).max_abs_numeric);
  });
  return biggest;
}

// Every token's k-th and (k+1)-th logit differ by >= 1e-3 (away from top-k boundaries, >> h).
void require_gaps(const RowMatrix<double>& x, moe::ConstMatrixView<double> gate, Index k) {
  for (const auto& p : probabilities(x, gate)) {
    std::vector<double> z;
    for (double v : p) z.push_back(std::log(v));
    std::sort(z.begin(), z.end(), std::greater<>());
    REQUIRE(z[static_cast<std::size_t>(k - 1)] - z[static_cast<std::size_t>(k)] >= 1e-3);
  }
}

}  // namespace

TEST_CASE("WithLosses: Mixtral top-2 + Switch + z-loss, values and whole-layer gradients", "[losses][grad]") {
  const MoEConfig cfg{.d_model = 6, .d_ff = 5, .n_experts = 4, .top_k = 2};
  using Router = routers::WithLosses<routers::TopKRouter<double>, losses::SwitchLoss, losses::ZLoss>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(routers::TopKRouter<double>(cfg), losses::SwitchLoss{.coeff = 0.3}, losses::ZLoss{.coeff = 0.05}),
      experts::SwiGLU<double>(cfg));
  layer.init(7);
  RowMatrix<double> x = tokens(9, 6, 1), y(9, 6);
  const RowMatrix<double> r = tokens(9, 6, 2);
  require_gaps(x, std::as_const(layer).router().inner().gate(), 2);

  moe::TrainingContext<double> ctx;
  const auto res = layer.forward(x, y, ctx);
  // References: Switch = 0.3 · 4 · Σ f P over the 18 slots; z-loss = 0.05 · mean lse².
  const auto p = probabilities(x, std::as_const(layer).router().inner().gate());
  double zsum = 0;
  for (Index t = 0; t < 9; ++t) {
    double lse = 0, m = -1e300;
    std::vector<double> z(4);
    for (Index e = 0; e < 4; ++e) {
      for (Index j = 0; j < 6; ++j) z[static_cast<std::size_t>(e)] += x(t, j) * std::as_const(layer).router().inner().gate()(e, j);
      m = std::max(m, z[static_cast<std::size_t>(e)]);
    }
    for (double v : z) lse += std::exp(v - m);
    zsum += std::pow(m + std::log(lse), 2);
  }
  const double switch_ref = switch_reference(p, chosen_ids(res), 0.3);
  REQUIRE(res.n_aux_losses == 2);
  CHECK(res.aux_losses[0] == Approx(switch_ref).epsilon(1e-12));
  CHECK(res.aux_losses[1] == Approx(0.05 * zsum / 9.0).epsilon(1e-12));
  CHECK(res.aux_loss == res.aux_losses[0] + res.aux_losses[1]);

  CHECK(check_layer_gradients(layer, ctx, x, r) > 1e-3);
}

TEST_CASE("WithLosses: the aux gradient is the loss's own (a layer without it differs by exactly that)", "[losses][grad]") {
  // With dy = 0 only the aux loss drives the router: its gradient must be non-zero and flow into the gate
  // only (the experts see nothing), and dx must be non-zero too (the router reads x).
  const MoEConfig cfg{.d_model = 5, .d_ff = 4, .n_experts = 4, .top_k = 1};
  using Router = routers::WithLosses<routers::TopKRouter<double>, losses::SwitchLoss>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(routers::TopKRouter<double>(cfg), losses::SwitchLoss{.coeff = 1.0}), experts::SwiGLU<double>(cfg));
  layer.init(3);
  RowMatrix<double> x = tokens(16, 5, 4), y(16, 5), dx(16, 5);
  const RowMatrix<double> zero = RowMatrix<double>::Zero(16, 5);
  moe::TrainingContext<double> ctx;
  layer.zero_grad();
  layer.forward(x, y, ctx);
  layer.backward(zero, dx, ctx);
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    INFO(name);
    const double norm = moe::detail::eigen(p.grad()).norm();
    if (name == "router.gate") {
      CHECK(norm > 1e-6);
    } else {
      CHECK(norm == 0.0);
    }
  });
  CHECK(dx.norm() > 1e-6);
}

TEST_CASE("WithLosses: sigmoid scores + sequence-wise loss over a packed batch", "[losses][grad]") {
  const MoEConfig cfg{.d_model = 5, .d_ff = 4, .n_experts = 6, .top_k = 2};
  using Router = routers::WithLosses<routers::TopKRouter<double>, losses::SequenceBalanceLoss>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(routers::TopKRouter<double>(cfg, {.score = routers::ScoreFunction::sigmoid, .routed_scaling_factor = 2.5}),
             losses::SequenceBalanceLoss{.coeff = 0.5}),
      experts::SwiGLU<double>(cfg));
  layer.init(11);
  RowMatrix<double> x = tokens(10, 5, 5), y(10, 5);
  const RowMatrix<double> r = tokens(10, 5, 6);
  const std::vector<Index> starts{0, 3, 7};
  require_gaps(x, std::as_const(layer).router().inner().gate(), 2);
  moe::TrainingContext<double> ctx;
  const auto res = layer.forward(x, y, ctx, starts);

  // Reference: per sequence, f over its slots and P the mean of s / Σs, averaged over the 3 sequences.
  double ref = 0;
  const Index bounds[] = {0, 3, 7, 10};
  for (int s = 0; s < 3; ++s) {
    std::vector<double> f(6, 0.0), P(6, 0.0);
    const double n = double(bounds[s + 1] - bounds[s]);
    for (Index t = bounds[s]; t < bounds[s + 1]; ++t) {
      for (Index k = 0; k < 2; ++k) f[static_cast<std::size_t>(res.expert_ids[static_cast<std::size_t>(t * 2 + k)])] += 1.0 / (2 * n);
      std::vector<double> sc(6);
      double sum = 0;
      for (Index e = 0; e < 6; ++e) {
        double z = 0;
        for (Index j = 0; j < 5; ++j) z += x(t, j) * std::as_const(layer).router().inner().gate()(e, j);
        sum += (sc[static_cast<std::size_t>(e)] = 1.0 / (1.0 + std::exp(-z)));
      }
      for (std::size_t e = 0; e < 6; ++e) P[e] += sc[e] / sum / n;
    }
    for (std::size_t e = 0; e < 6; ++e) ref += 0.5 * 6.0 * f[e] * P[e] / 3.0;
  }
  CHECK(res.aux_loss == Approx(ref).epsilon(1e-12));

  moe::Workspace ws;
  CHECK(check_layer_gradients(layer, ctx, x, r, [&](const RowMatrix<double>& in, RowMatrix<double>& out) {
          return layer.forward(in, out, ws, starts).aux_loss;
        }) > 1e-3);
}

namespace {

// A layer of 3 true + 3 null experts, top-3, under `loss`: its aux loss against reference(p, chosen) (p over the 6
// columns: the 3 gate rows, then the 3 null_gate rows; each token's top-3 columns), and its whole-layer gradients.
template <class Loss, class Reference>
void check_null_expert_loss(Loss loss, Reference&& reference) {
  const MoEConfig cfg{.d_model = 6, .d_ff = 4, .n_experts = 3, .top_k = 3};
  using Router = routers::WithLosses<routers::NullExpertRouter<double>, Loss>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(routers::NullExpertRouter<double>(cfg, {.n_null_experts = 3}), loss), experts::SwiGLU<double>(cfg));
  layer.init(13);
  RowMatrix<double> x = tokens(12, 6, 7), y(12, 6);
  RowMatrix<double> r = tokens(12, 6, 8);
  // Read before the training forward: the router's accessors are non-const, and backward refuses weights
  // accessed through them after the forward.
  RowMatrix<double> gate(6, 6);
  gate.topRows(3) = moe::detail::eigen(layer.router().inner().gate());
  gate.bottomRows(3) = moe::detail::eigen(layer.router().inner().null_gate());
  moe::TrainingContext<double> ctx;
  const auto res = layer.forward(x, y, ctx);
  const auto p = probabilities(x, gate);
  std::vector<std::vector<std::size_t>> chosen;
  std::vector<Index> null_slots(3, 0);
  for (const auto& pt : p) {
    chosen.push_back(top_columns(pt, 4));
    REQUIRE(std::log(pt[chosen.back()[2]]) - std::log(pt[chosen.back()[3]]) >= 1e-3);
    chosen.back().resize(3);
    for (std::size_t c : chosen.back())
      if (c >= 3) ++null_slots[c - 3];
  }
  REQUIRE(null_slots[0] + null_slots[1] + null_slots[2] > 0);  // the check covers null columns,
  REQUIRE(null_slots[0] != null_slots[2]);                     // unevenly: averaging their frequencies matters
  CHECK(res.aux_loss == Approx(reference(p, chosen)).epsilon(1e-12));
  CHECK(check_layer_gradients(layer, ctx, x, r) > 1e-3);
}

// AdaMoE's Eq. 6: f per token (Σ f = 3), the null columns' f replaced by their mean unless balance_nulls,
// l = coeff · 6 · Σ f̃ P.
double adamoe_reference(const std::vector<std::vector<double>>& p, const std::vector<std::vector<std::size_t>>& chosen,
                        double coeff, bool balance_nulls) {
  std::vector<double> f(6, 0.0), P(6, 0.0);
  for (std::size_t t = 0; t < p.size(); ++t) {
    for (std::size_t c : chosen[t]) f[c] += 1.0 / double(p.size());
    for (std::size_t c = 0; c < 6; ++c) P[c] += p[t][c] / double(p.size());
  }
  if (!balance_nulls) f[3] = f[4] = f[5] = (f[3] + f[4] + f[5]) / 3.0;
  double value = 0;
  for (std::size_t c = 0; c < 6; ++c) value += coeff * 6.0 * f[c] * P[c];
  return value;
}

}  // namespace

TEST_CASE("WithLosses over AdaMoE null experts: SwitchLoss balances each null, AdaMoELoss is the paper's Eq. 6",
          "[losses][grad][null]") {
  check_null_expert_loss(losses::SwitchLoss{.coeff = 0.2},
                         [](const auto& p, const auto& chosen) { return switch_reference(p, chosen, 0.2); });
  for (const bool balance_nulls : {false, true}) {
    INFO("balance_nulls " << balance_nulls);
    check_null_expert_loss(
        losses::AdaMoELoss{.coeff = 0.2, .balance_nulls = balance_nulls},
        [&](const auto& p, const auto& chosen) { return adamoe_reference(p, chosen, 0.2, balance_nulls); });
  }
}

TEST_CASE("WithLosses under a capacity limit: losses on the choice before dropping, drops reported", "[losses][grad]") {
  const MoEConfig cfg{.d_model = 5, .d_ff = 4, .n_experts = 4, .top_k = 2};
  using Inner = routers::WithLosses<routers::TopKRouter<double>, losses::SwitchLoss>;
  using Router = routers::CapacityLimited<Inner>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(Inner(routers::TopKRouter<double>(cfg, {.renormalize = false}), losses::SwitchLoss{.coeff = 0.4}),
             {.capacity_factor = 0.75}),
      experts::SwiGLU<double>(cfg));
  layer.init(17);
  RowMatrix<double> x = tokens(8, 5, 9), y(8, 5);
  const RowMatrix<double> r = tokens(8, 5, 10);
  require_gaps(x, std::as_const(layer).router().inner().inner().gate(), 2);
  moe::TrainingContext<double> ctx;
  const auto res = layer.forward(x, y, ctx);
  REQUIRE(res.dropped_slots > 0);
  REQUIRE(res.n_aux_losses == 1);
  // Before dropping every token holds 2 slots: f sums to 1 over the 16 chosen slots.
  const auto p = probabilities(x, std::as_const(layer).router().inner().inner().gate());
  std::vector<std::vector<std::size_t>> chosen;
  for (const auto& pt : p) chosen.push_back(top_columns(pt, 2));
  const double ref = switch_reference(p, chosen, 0.4);
  CHECK(res.aux_loss == Approx(ref).epsilon(1e-12));
  CHECK(check_layer_gradients(layer, ctx, x, r) > 1e-3);
}

TEST_CASE("WithLosses in an MoE++ layer: MoEPlusPlusLoss is Eq. 7, τ on zero-computation experts, no factor E",
          "[losses][moepp][grad]") {
  const Index d = 6;
  using Router = routers::WithLosses<routers::TopKRouter<double>, losses::MoEPlusPlusLoss>;
  const auto make = [&](double tau) {
    return moe::MoELayer<Router, experts::SwiGLU<double>, experts::ConstantExperts<double>,
                         experts::CopyExperts<double>, experts::ZeroExperts<double>>(
        Router(
            routers::TopKRouter<double>({.d_model = d, .d_ff = 4, .n_experts = 6, .top_k = 2}, {.renormalize = false}),
            losses::MoEPlusPlusLoss{.coeff = 1.0, .tau = tau}),
        experts::SwiGLU<double>({.d_model = d, .d_ff = 4, .n_experts = 3}), experts::ConstantExperts<double>(1, d),
        experts::CopyExperts<double>(1, d), experts::ZeroExperts<double>(1, d));
  };
  auto full = make(1.0), weighted = make(0.25);
  full.init(21);
  weighted.init(21);
  RowMatrix<double> x = tokens(30, d, 11), r = tokens(30, d, 12);
  RowMatrix<double> y(30, d);
  const auto a = full.forward(x, y), b = weighted.forward(x, y);
  // Reference: Σ_e η_e f_e P_e with η = 0.25 on experts 3, 4, 5 and f per token (Σ f = 2): the Switch form's
  // value (coeff · 6 · Σ η f P with Σ f = 1) times 2 / 6.
  const auto p = probabilities(x, full.router().inner().gate());
  const auto chosen = chosen_ids(a);
  Index zero_computation_slots = 0;
  for (const auto& c : chosen)
    for (std::size_t e : c) zero_computation_slots += e >= 3;
  REQUIRE(zero_computation_slots > 0);
  const double plain = switch_reference(p, chosen, 1.0) * 2.0 / 6.0,
               tau = switch_reference(p, chosen, 1.0, {1, 1, 1, 0.25, 0.25, 0.25}) * 2.0 / 6.0;
  CHECK(a.aux_loss == Approx(plain).epsilon(1e-12));
  CHECK(b.aux_loss == Approx(tau).epsilon(1e-12));
  moe::TrainingContext<double> ctx;
  weighted.forward(x, y, ctx);
  CHECK(check_layer_gradients(weighted, ctx, x, r) > 1e-3);
}

TEST_CASE("WithLosses + GlobalBatchLoss: training forwards accumulate, backward and inference do not", "[losses][global]") {
  const MoEConfig cfg{.d_model = 5, .d_ff = 4, .n_experts = 4, .top_k = 2};
  using Router = routers::WithLosses<routers::TopKRouter<double>, losses::GlobalBatchLoss>;
  moe::MoELayer<Router, experts::SwiGLU<double>> layer(
      Router(routers::TopKRouter<double>(cfg), losses::GlobalBatchLoss(0.1)), experts::SwiGLU<double>(cfg));
  layer.init(23);
  moe::TrainingContext<double> ctx;
  const moe::GlobalBatchCounts& global = ctx.global_batch();
  RowMatrix<double> y(6, 5), dx(6, 5);
  double total = 0;
  for (int micro = 0; micro < 3; ++micro) {
    const RowMatrix<double> x = tokens(6, 5, 30 + static_cast<std::uint64_t>(micro));
    const auto res = layer.forward(x, y, ctx);
    total += 12;
    CHECK(global.micro_batches == micro + 1);
    double sum = 0;
    for (double c : global.counts) sum += c;
    CHECK(sum == total);
    layer.backward(y, dx, ctx);  // backward leaves the counts alone
    CHECK(global.micro_batches == micro + 1);
    layer.forward(x, y);         // so does an inference forward
    CHECK(global.micro_batches == micro + 1);
    CHECK(res.aux_loss > 0);
  }
  ctx.global_batch().reset();
  CHECK(global.micro_batches == 0);
  for (double c : global.counts) CHECK(c == 0.0);
}

TEST_CASE("WithLosses: forward, aux loss and gradients are bitwise equal for 1-4 threads (with jitter)", "[losses][determinism]") {
  const MoEConfig cfg{.d_model = 24, .d_ff = 16, .n_experts = 8, .top_k = 2};
  using Router = routers::WithLosses<routers::TopKRouter<float>, losses::SwitchLoss, losses::ZLoss>;
  moe::MoELayer<Router, experts::SwiGLU<float>> layer(
      Router(routers::TopKRouter<float>(cfg, {.jitter = 0.01, .seed = 5}), losses::SwitchLoss{}, losses::ZLoss{}),
      experts::SwiGLU<float>(cfg));
  layer.init(29);
  layer.router().inner().set_training(true);
  moe::test::Rng rng(31);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 300, 24), dy = moe::test::normal_matrix<float>(rng, 300, 24);
  std::vector<float> first;
  double first_aux = 0;
  moe::test::for_each_thread_count([&](int threads) {
    moe::TrainingContext<float> ctx;
    RowMatrix<float> y(300, 24), dx(300, 24);
    layer.zero_grad();
    const double aux = layer.forward(x, y, ctx).aux_loss;
    layer.backward(dy, dx, ctx);
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    layer.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
      all.insert(all.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
    });
    INFO("threads " << threads);
    if (first.empty()) {
      first = all;
      first_aux = aux;
    } else {
      CHECK(all == first);
      CHECK(aux == first_aux);
    }
  });
}

TEST_CASE("WithLosses: the EvoMoE dense-to-sparse gate, LoRA and GRU banks, each with a balance loss", "[losses][grad]") {
  SECTION("dense-to-sparse gate (training: Gumbel noise, active experts above the threshold)") {
    const MoEConfig cfg{.d_model = 5, .d_ff = 4, .n_experts = 4, .top_k = 4};
    using Router = routers::WithLosses<routers::DenseToSparseGate<double>, losses::SwitchLoss>;
    moe::MoELayer<Router, experts::SwiGLU<double>> layer(
        Router(routers::DenseToSparseGate<double>(cfg, {.min_temperature = 0.05, .decay_steps = 100, .seed = 3}), losses::SwitchLoss{.coeff = 0.3}),
        experts::SwiGLU<double>(cfg));
    layer.init(37);
    layer.router().inner().set_step(100);  // τ = 0.05: few experts active
    RowMatrix<double> x = tokens(10, 5, 12);
    const RowMatrix<double> r = tokens(10, 5, 13);
    RowMatrix<double> y(10, 5);
    const RowMatrix<double> gate = moe::detail::eigen(layer.router().inner().gate());  // read before the forward
    moe::TrainingContext<double> ctx;
    const auto res = layer.forward(x, y, ctx);
    const auto chosen = chosen_ids(res);
    std::size_t active = 0;
    for (const auto& c : chosen) active += c.size();
    REQUIRE(active < 40);  // sparse: not every expert active
    CHECK(res.aux_loss == Approx(switch_reference(probabilities(x, gate), chosen, 0.3)).epsilon(1e-12));
    CHECK(check_layer_gradients(layer, ctx, x, r) > 1e-3);
  }
  SECTION("LoRA experts on a frozen base (LLaVA-MoLE)") {
    const MoEConfig cfg{.d_model = 6, .d_ff = 5, .n_experts = 3, .top_k = 1};
    using Router = routers::WithLosses<routers::TopKRouter<double>, losses::SwitchLoss>;
    moe::MoELayer<Router, experts::LoRASwiGLU<double>> layer(
        Router(routers::TopKRouter<double>(cfg, {.renormalize = false}), losses::SwitchLoss{.coeff = 0.5}),
        experts::LoRASwiGLU<double>(cfg, {.rank = 2}));
    layer.init(39);
    // B starts at zero (LoRA's init): give it values so every adapter weight has a gradient to check.
    moe::test::Rng rng(40);
    layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
      if (name.find("lora_b") != std::string::npos)
        for (Index i = 0; i < p.rows() * p.cols(); ++i) p.data()[i] = 0.3 * rng.normal();
    });
    RowMatrix<double> x = tokens(8, 6, 14);
    const RowMatrix<double> r = tokens(8, 6, 15);
    require_gaps(x, std::as_const(layer).router().inner().gate(), 1);
    RowMatrix<double> y(8, 6);
    moe::TrainingContext<double> ctx;
    CHECK(layer.forward(x, y, ctx).aux_loss > 0);
    CHECK(check_layer_gradients(layer, ctx, x, r) > 1e-3);
  }
  SECTION("GRU experts carrying state along the sequences of a packed batch (Hecto)") {
    const MoEConfig cfg{.d_model = 5, .d_ff = 1, .n_experts = 2, .top_k = 1};
    using Router = routers::WithLosses<routers::TopKRouter<double>, losses::SequenceBalanceLoss>;
    moe::MoELayer<Router, experts::GRU<double>> layer(
        Router(routers::TopKRouter<double>(cfg, {.renormalize = false}), losses::SequenceBalanceLoss{.coeff = 0.5}),
        experts::GRU<double>(cfg));
    layer.init(41);
    RowMatrix<double> x = tokens(9, 5, 16);
    const RowMatrix<double> r = tokens(9, 5, 17);
    require_gaps(x, std::as_const(layer).router().inner().gate(), 1);
    const std::vector<Index> starts{0, 4};
    RowMatrix<double> y(9, 5);
    moe::TrainingContext<double> ctx;
    CHECK(layer.forward(x, y, ctx, starts).aux_loss > 0);
    moe::Workspace ws;
    CHECK(check_layer_gradients(layer, ctx, x, r, [&](const RowMatrix<double>& in, RowMatrix<double>& out) {
            return layer.forward(in, out, ws, starts).aux_loss;
          }) > 1e-3);
  }
}

TEST_CASE("route_logits(balance_logits(x)) is route(x), bitwise: WithLosses runs the gate once", "[losses]") {
  const auto same = [](const auto& router, const RowMatrix<double>& x) {
    const Index n = x.rows(), W = router.balance_width();
    const auto a = moe::test::route(router, x);
    RowMatrix<double> z(n, W);
    moe::Workspace ws(1 << 20);
    moe::Arena arena(ws);
    router.balance_logits({.x = x}, z, arena);
    const auto b = moe::test::route_logits(router, z);
    CHECK(a.ids == b.ids);
    CHECK(a.weights == b.weights);
    REQUIRE(a.saved_bytes == b.saved_bytes);  // the whole saved block, byte for byte
    CHECK(std::memcmp(a.saved_ws.data(), b.saved_ws.data(), a.saved_bytes) == 0);
  };
  const RowMatrix<double> x = tokens(40, 6, 21);
  const MoEConfig cfg{.d_model = 6, .d_ff = 4, .n_experts = 5, .top_k = 3};
  moe::Rng rng(22);
  routers::NullExpertRouter<double> null_router(cfg, {.n_null_experts = 4});
  null_router.init(rng);
  same(null_router, x);
  routers::DenseToSparseGate<double> dts(cfg, {.decay_steps = 10, .seed = 2});
  dts.init(rng);
  dts.set_step(5);
  same(dts, x);
  routers::TopKRouter<double> jittered(cfg, {.jitter = 0.1, .gumbel_noise = true, .seed = 3});
  jittered.init(rng);
  jittered.set_training(true);
  same(jittered, x);
}
