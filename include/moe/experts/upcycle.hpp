#pragma once
/// @file experts/upcycle.hpp
/// @brief Sparse upcycling: a routed bank whose every expert starts as a copy of one expert of a trained
/// bank (a dense FFN is a bank of one expert), optionally perturbed.
///
/// Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) as MoE-LLaVA (arXiv 2401.15947) runs it, checked
/// against its official code (PKU-YuanGroup/MoE-LLaVA, `initialize_moe_modules` in
/// moellava/model/language_model/llava_llama_moe.py): DeepSpeed's `MoE(expert = the dense MLP, k = 2)` copies
/// the trained MLP into every expert (the code then asserts each copy equals it) beside a freshly initialised
/// gate, and DeepSpeed's top-2 gate renormalises the two weights. So with identical experts and routing weights
/// that sum to 1 (a renormalised top-k router such as routers::presets::mixtral(), no capacity drops) the first
/// forward equals the dense layer's output whatever the router's weights are; training then moves the experts
/// apart. MoE-LLaVA adds no noise; `noise` > 0 is an option of this library (each copied weight matrix gets
/// N(0, (noise · its rms)²) per element; parameters of one row per expert, the biases, are copied exactly).

#include <cmath>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"

namespace moe::experts {

/// Options of upcycle().
struct UpcycleOptions {
  Index source_expert = 0;  ///< the expert of the source bank every new expert copies
  double noise = 0;         ///< relative std of the perturbation of each weight matrix, finite, >= 0
  std::uint64_t seed = 0;   ///< seed of the perturbation
};

/// A bank of cfg.n_experts experts, each a copy of `source`'s expert options.source_expert, built with the
/// source's options (`Bank(cfg, source.options())`). For banks whose parameters stack their experts' rows
/// (expert-major, as FFN's w1/w3/w2 and biases). Throws moe::Error when cfg's d_model or d_ff differ from
/// the source's, the source expert is out of range, or noise is negative or not finite; the source is only read.
template <class Bank>
Bank upcycle(const Bank& source, const MoEConfig& cfg, const UpcycleOptions& options = {}) {
  constexpr const char* owner = "moe::experts::upcycle";
  moe::detail::require(cfg.d_model == source.d_model() && cfg.d_ff == source.d_ff(), owner, ": cfg is (d_model ",
                       cfg.d_model, ", d_ff ", cfg.d_ff, "), the source bank (", source.d_model(), ", ", source.d_ff(),
                       ")");
  moe::detail::require(options.source_expert >= 0 && options.source_expert < source.n_experts(), owner,
                       ": options.source_expert = ", options.source_expert, " of ", source.n_experts(), " experts");
  moe::detail::require_in(options.noise, moe::detail::k_non_negative, owner, "options.noise");
  std::vector<std::pair<std::string, ConstMatrixView<typename Bank::Scalar>>> from;
  source.visit_parameters([&](std::string_view name, const auto& p) { from.emplace_back(name, p.value()); });

  using T = typename Bank::Scalar;
  Bank bank(cfg, source.options());
  Rng rng(options.seed);
  std::size_t i = 0;
  bank.visit_parameters([&](std::string_view name, Parameter<T>& p) {
    moe::detail::require(from[i].first == name, owner, ": parameter ", i, " is ", name, " here, ", from[i].first,
                         " in the source");
    const ConstMatrixView<T> src = from[i++].second;
    const Index rows = src.rows() / source.n_experts();  // one expert's rows
    const ConstMatrixView<T> expert(src.row(options.source_expert * rows), rows, src.cols(), src.stride());
    const bool perturb = options.noise > 0 && rows > 1;  // matrices, not the one-row-per-expert biases
    double rms = 0;
    for (Index r = 0; perturb && r < rows; ++r)
      for (Index c = 0; c < expert.cols(); ++c) rms += double(expert(r, c)) * double(expert(r, c));
    const double std = perturb ? options.noise * std::sqrt(rms / double(rows * expert.cols())) : 0.0;
    MatrixView<T> to = p.value();
    for (Index e = 0; e < cfg.n_experts; ++e) {
      for (Index r = 0; r < rows; ++r) {
        T* out = to.row(e * rows + r);
        for (Index c = 0; c < expert.cols(); ++c)
          out[c] = perturb ? static_cast<T>(double(expert(r, c)) + std * rng.normal()) : expert(r, c);
      }
    }
  });
  return bank;
}

}  // namespace moe::experts
