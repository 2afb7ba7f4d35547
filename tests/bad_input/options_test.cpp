// Floating-point options (issue 12, bug 5): every one of every policy is checked at construction (or, for a
// runtime argument, at the call): NaN, ±inf and values outside its range throw moe::Error whose message names
// the owner, the field and the value seen; the edges of the range are accepted. Before, LoRA's alpha = NaN
// built a bank whose every output was NaN, and many others (learning rates, scaling factors, init scales)
// accepted inf or values no float can hold.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/experts/gru.hpp>
#include <moe/experts/init.hpp>
#include <moe/experts/lora.hpp>
#include <moe/losses/adamoe_loss.hpp>
#include <moe/losses/global_batch.hpp>
#include <moe/losses/moe_plus_plus_loss.hpp>
#include <moe/losses/sequence_balance.hpp>
#include <moe/losses/switch_loss.hpp>
#include <moe/losses/z_loss.hpp>
#include <moe/optim/adamw.hpp>
#include <moe/optim/grad_clip.hpp>
#include <moe/optim/sgd.hpp>
#include <moe/routers/capacity.hpp>
#include <moe/routers/dense_to_sparse.hpp>
#include <moe/routers/expert_choice.hpp>
#include <moe/routers/top_k_router.hpp>
#include <moe/routers/with_losses.hpp>

using Catch::Matchers::Contains;
using moe::Index;

namespace {

constexpr double k_nan = std::numeric_limits<double>::quiet_NaN();
constexpr double k_inf = std::numeric_limits<double>::infinity();
constexpr double k_float_max = FLT_MAX;
// The smallest temperature whose inverse is a finite float.
const double k_min_float_temperature = 1.0 / k_float_max;

const moe::MoEConfig k_shape{.d_model = 4, .d_ff = 8, .n_experts = 4, .top_k = 2};

struct NoParameters {
  template <class F>
  void visit_parameters(F&&) {}
};

// A gate built with `o` whose temperature stays a finite positive number over its whole schedule.
void dense_to_sparse(moe::routers::DenseToSparseOptions o) {
  for (const auto decay : {moe::routers::TemperatureDecay::exponential, moe::routers::TemperatureDecay::linear}) {
    o.decay = decay;
    moe::routers::DenseToSparseGate<float> gate(k_shape, o);
    for (const std::uint64_t step : {0ull, 1ull, 500ull, 1000ull, 1000000000ull}) {
      gate.set_step(step);
      if (!(std::isfinite(gate.temperature()) && gate.temperature() > 0))
        throw std::runtime_error("temperature " + std::to_string(gate.temperature()) + " at step " + std::to_string(step));
    }
  }
}

// One floating-point option: how to build its owner with a value, and the values it must reject (besides NaN
// and ±inf, which every option rejects) and accept.
struct Option {
  std::string owner;  // in the message, e.g. "moe::routers::TopKRouter"
  std::string field;  // in the message, e.g. "options.temperature"
  std::function<void(double)> build;
  std::vector<double> out_of_range;
  std::vector<double> valid;
};

using moe::routers::TopKOptions;
using moe::routers::TopKRouter;

std::vector<Option> options() {
  const auto top_k = [](TopKOptions o) { TopKRouter<float> r(k_shape, o); };
  const auto dts = dense_to_sparse;
  const auto lora = [](moe::experts::LoRAOptions o) { moe::experts::LoRASwiGLU<float> b(k_shape, o); };
  const auto normal = [](double s) { return moe::experts::InitPolicy{moe::experts::Normal{.std = s}}; };
  const double std_max = k_float_max / 16;  // a draw within 9 standard deviations stays a finite float
  const auto with = [](auto loss) {
    moe::routers::WithLosses<TopKRouter<float>, decltype(loss)> r(TopKRouter<float>(k_shape), loss);
  };
  return {
      // routers
      {"moe::routers::TopKRouter",
       "options.routed_scaling_factor",
       [=](double v) { top_k({.routed_scaling_factor = v}); },
       {0.0, -0.0, -1.0, -1e40, 1e39},
       {1e-300, 2.5, k_float_max}},
      {"moe::routers::TopKRouter",
       "options.temperature",
       [=](double v) { top_k({.temperature = v}); },
       {0.0, -1.0, -1e40, 1e-39},
       {k_min_float_temperature, 0.5, 1e300}},
      {"moe::routers::TopKRouter",
       "options.jitter",
       [=](double v) { top_k({.jitter = v}); },
       {-1e-9, 1.0, 2.0, -1e40},
       {0.0, 0.01, 0.999}},
      {"moe::routers::TopKRouter::update_bias",
       "rate",
       [](double v) {
         TopKRouter<float> r(k_shape, {.selection_bias = true});
         r.update_bias(std::vector<Index>(4, 1), v);
       },
       {-1e-3, -1e40, 1e39},
       {0.0, 1e-3, k_float_max}},
      {"moe::routers::CapacityLimited",
       "options.capacity_factor",
       [](double v) {
         moe::routers::CapacityLimited<TopKRouter<float>> r(TopKRouter<float>(k_shape), {.capacity_factor = v});
       },
       {0.0, -1.0, -1e40},
       {DBL_MIN, 1.25, 1e300}},
      {"moe::routers::CapacityLimited",
       "options.heterogeneous_tau",
       [](double v) {
         moe::routers::CapacityLimited<TopKRouter<float>> r(TopKRouter<float>(k_shape), {.heterogeneous_tau = v});
       },
       {0.0, -0.5, 1.5},
       {0.75, 1.0, 1e-3}},
      {"moe::routers::ExpertChoiceRouter",
       "options.capacity_factor",
       [](double v) { moe::routers::ExpertChoiceRouter<float> r(k_shape, {.capacity_factor = v}); },
       {0.0, -1.0, -1e40},
       {DBL_MIN, 2.0, 1e300}},
      {"moe::routers::DenseToSparseGate",
       "options.threshold",
       [=](double v) { dts({.threshold = v}); },
       {0.0, 1.0, -0.5, 1.5, -1e40},
       {1e-300, 0.001, 0.999}},
      {"moe::routers::DenseToSparseGate",
       "options.max_temperature",
       [=](double v) { dts({.max_temperature = v, .min_temperature = k_min_float_temperature}); },
       {0.0, -1.0, 1e-40, -1e40},
       {k_min_float_temperature, 1.0, 1e300}},
      {"moe::routers::DenseToSparseGate",
       "options.min_temperature",
       [=](double v) { dts({.max_temperature = 2.0, .min_temperature = v}); },
       {0.0, -1.0, 1e-40, 3.0},
       {k_min_float_temperature, 0.5, 2.0}},
      // experts
      {"moe::experts::LoRA",
       "opts.alpha",
       [=](double v) { lora({.rank = 8, .alpha = v}); },
       {0.0, -1.0, -1e40, 1e40},
       {1e-300, 16.0, 2e39}},
      {"moe::experts::LoRA",
       "opts.base_init (Normal).std",
       [=](double v) { lora({.base_init = normal(v)}); },
       {-1e-3, -1e40, 1e38},
       {0.0, 0.02, std_max}},
      {"moe::experts::LoRA",
       "opts.a_init (Normal).std",
       [=](double v) { lora({.a_init = normal(v)}); },
       {-1e-3, 1e38},
       {0.0, 0.02}},
      {"moe::experts::LoRA",
       "opts.b_init (Normal).std",
       [=](double v) { lora({.b_init = normal(v)}); },
       {-1e-3, 1e38},
       {0.0, 0.02}},
      {"moe::experts::FFN",
       "opts.init (Normal).std",
       [=](double v) { moe::experts::SwiGLU<float> b(k_shape, {.init = normal(v)}); },
       {-1e-3, -1e40, 1e38},
       {0.0, 0.02, std_max}},
      {"moe::experts::GRU",
       "init (Normal).std",
       [=](double v) { moe::experts::GRU<float> b(k_shape, normal(v)); },
       {-1e-3, 1e38},
       {0.0, 0.02}},
      // losses
      {"moe::losses::SwitchLoss",
       "coeff",
       [=](double v) { with(moe::losses::SwitchLoss{.coeff = v}); },
       {-1e-3, -1e40},
       {0.0, 1e-2, 1e300}},
      {"moe::losses::MoEPlusPlusLoss",
       "coeff",
       [=](double v) { with(moe::losses::MoEPlusPlusLoss{.coeff = v}); },
       {-1e-3, -1e40},
       {0.0, 1e-2}},
      {"moe::losses::MoEPlusPlusLoss",
       "tau",
       [=](double v) { with(moe::losses::MoEPlusPlusLoss{.tau = v}); },
       {-1e-3, -1e40},
       {0.0, 0.75}},
      {"moe::losses::AdaMoELoss",
       "coeff",
       [=](double v) { with(moe::losses::AdaMoELoss{.coeff = v}); },
       {-1e-3, -1e40},
       {0.0, 2e-2}},
      {"moe::losses::ZLoss", "coeff", [=](double v) { with(moe::losses::ZLoss{.coeff = v}); }, {-1e-3}, {0.0, 1e-3}},
      {"moe::losses::SequenceBalanceLoss",
       "coeff",
       [=](double v) { with(moe::losses::SequenceBalanceLoss{.coeff = v}); },
       {-1e-3},
       {0.0, 1e-4}},
      {"moe::losses::GlobalBatchLoss",
       "coeff",
       [](double v) { moe::losses::GlobalBatchLoss l(v); },
       {-1e-3},
       {0.0, 1e-2}},
      // optimizers
      {"moe::optim::AdamWConfig",
       "lr",
       [](double v) { moe::optim::AdamW<float> o({.lr = v}); },
       {0.0, -1e-3, 1e39},
       {1e-300, 1e-3, k_float_max}},
      {"moe::optim::AdamWConfig",
       "beta1",
       [](double v) { moe::optim::AdamW<float> o({.beta1 = v}); },
       {-0.1, 1.0, 1.5},
       {0.0, 0.9, 0.999999}},
      {"moe::optim::AdamWConfig",
       "beta2",
       [](double v) { moe::optim::AdamW<float> o({.beta2 = v}); },
       {-0.1, 1.0, 1.5},
       {0.0, 0.999}},
      {"moe::optim::AdamWConfig",
       "eps",
       [](double v) { moe::optim::AdamW<float> o({.eps = v}); },
       {0.0, -1e-8, 1e39},
       {1e-300, 1e-8, 1.0}},
      {"moe::optim::AdamWConfig",
       "weight_decay",
       [](double v) { moe::optim::AdamW<float> o({.weight_decay = v}); },
       {-1e-3, 1e39},
       {0.0, 0.1, k_float_max}},
      {"moe::optim::AdamW::set_lr",
       "lr",
       [](double v) {
         moe::optim::AdamW<float> o({});
         o.set_lr(v);
       },
       {0.0, -1.0, 1e39},
       {1e-300, 3e-4}},
      {"moe::optim::SGDConfig",
       "lr",
       [](double v) { moe::optim::SGD<float> o({.lr = v}); },
       {0.0, -1e-3, 1e39},
       {1e-300, 0.1, k_float_max}},
      {"moe::optim::SGDConfig",
       "momentum",
       [](double v) { moe::optim::SGD<float> o({.momentum = v}); },
       {-0.1, 1.0, 2.0},
       {0.0, 0.9}},
      {"moe::optim::SGDConfig",
       "weight_decay",
       [](double v) { moe::optim::SGD<float> o({.weight_decay = v}); },
       {-1e-3, 1e39},
       {0.0, 1e-4}},
      {"moe::optim::SGD::set_lr",
       "lr",
       [](double v) {
         moe::optim::SGD<float> o({});
         o.set_lr(v);
       },
       {0.0, -1.0, 1e39},
       {1e-300, 0.05}},
      {"moe::optim::clip_grad_norm",
       "max_norm",
       [](double v) {
         NoParameters model;
         moe::optim::clip_grad_norm(model, v);
       },
       {0.0, -1.0},
       {1e-300, 1.0, 1e300}},
  };
}

}  // namespace

TEST_CASE("Every floating-point option rejects NaN, ±inf and out-of-range values, naming owner and field",
          "[bad_input]") {
  for (const Option& o : options()) {
    std::vector<double> bad = {k_nan, k_inf, -k_inf};
    bad.insert(bad.end(), o.out_of_range.begin(), o.out_of_range.end());
    for (const double v : bad) {
      INFO(o.owner << ": " << o.field << " = " << v);
      REQUIRE_THROWS_AS(o.build(v), moe::Error);
      REQUIRE_THROWS_WITH(o.build(v), Contains(o.owner + ": " + o.field + " = "));
      if (!std::isfinite(v)) REQUIRE_THROWS_WITH(o.build(v), Contains(" must be finite"));
    }
  }
}

TEST_CASE("Every floating-point option accepts the valid edges of its range", "[bad_input]") {
  for (const Option& o : options()) {
    for (const double v : o.valid) {
      INFO(o.owner << ": " << o.field << " = " << v);
      REQUIRE_NOTHROW(o.build(v));
    }
  }
}

TEST_CASE("The messages show the value seen", "[bad_input]") {
  REQUIRE_THROWS_WITH(moe::experts::LoRASwiGLU<float>(k_shape, {.alpha = k_nan}),
                      Contains("moe::experts::LoRA: opts.alpha = nan must be finite and in (0, "));
  REQUIRE_THROWS_WITH(moe::experts::LoRASwiGLU<float>(k_shape, {.alpha = -1e40}), Contains("opts.alpha = -1e+40"));
  REQUIRE_THROWS_WITH(TopKRouter<float>(k_shape, {.temperature = -k_inf}),
                      Contains("options.temperature = -inf must be finite and >= "));
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.beta1 = 1.0}),
                      Contains("moe::optim::AdamWConfig: beta1 = 1 must be finite and in [0, 1)"));
  REQUIRE_THROWS_WITH(moe::optim::SGD<float>({.lr = k_inf}), Contains("lr = inf must be finite and in (0, "));
}

TEST_CASE("The float bounds follow the scalar type: a double router takes what a float one cannot", "[bad_input]") {
  REQUIRE_THROWS_WITH(TopKRouter<float>(k_shape, {.routed_scaling_factor = 1e39}),
                      Contains("options.routed_scaling_factor = 1e+39"));
  REQUIRE_NOTHROW(TopKRouter<double>(k_shape, {.routed_scaling_factor = 1e39}));
  REQUIRE_NOTHROW(TopKRouter<double>(k_shape, {.temperature = 1e-300}));
  REQUIRE_NOTHROW(moe::experts::LoRASwiGLU<double>(k_shape, {.alpha = 1e300}));
  REQUIRE_NOTHROW(moe::optim::AdamW<double>({.lr = 1e300}));
  // An alpha valid for every float rank can still be too large for rank 1.
  REQUIRE_NOTHROW(moe::experts::LoRASwiGLU<float>(k_shape, {.rank = 8, .alpha = 2e39}));
  REQUIRE_THROWS_WITH(moe::experts::LoRASwiGLU<float>(k_shape, {.rank = 1, .alpha = 2e39}), Contains("opts.alpha"));
}
