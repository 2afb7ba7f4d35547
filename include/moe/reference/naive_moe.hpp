#pragma once
/// @file reference/naive_moe.hpp
/// @brief Independent plain-loop double-precision MoE (one token at a time) for single-bank top-k softmax
/// layers: the oracle of the layer tests, the self-check of the examples and the naive baseline of the
/// benchmarks. It shares no code with the library's kernels (its own dot products, softmax, selection and
/// activation formulas), so a bug in those cannot hide in both. Slow by design; not part of moe.hpp.

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"

namespace moe::reference {

/// Reference formula of an activation, looked up by the name its library functor reports.
inline double (*naive_activation(const std::string& name))(double) {
  if (name == "silu") return [](double x) { return x / (1.0 + std::exp(-x)); };
  if (name == "relu") return [](double x) { return x > 0 ? x : 0.0; };
  if (name == "gelu") return [](double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); };
  if (name == "gelu_tanh")
    return [](double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); };
  throw std::invalid_argument("naive_activation: unknown activation " + name);
}

/// Naive forward of a single-bank top-k softmax layer. Returns y (n_tokens, d_model) in double and, per
/// token, the chosen expert ids in descending probability order (ties: lower id).
template <class Layer>
RowMatrix<double> naive_moe_forward(const Layer& layer, ConstMatrixView<typename Layer::Scalar> x,
                                    std::vector<std::vector<Index>>* chosen = nullptr) {
  const auto& router = layer.router();
  const auto& bank = layer.template bank<0>();
  using Bank = std::remove_cvref_t<decltype(bank)>;
  const Index d = layer.d_model(), E = layer.n_experts(), k = layer.top_k(), ff = bank.d_ff();
  const auto gate = router.gate();
  RowMatrix<double> y = RowMatrix<double>::Zero(x.rows(), d);
  if (chosen) chosen->assign(static_cast<std::size_t>(x.rows()), {});
  const auto act = naive_activation(Bank::Activation::name());
  std::vector<double> logits(E), h(ff);
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index e = 0; e < E; ++e) {
      double acc = 0;
      for (Index j = 0; j < d; ++j) acc += double(gate(e, j)) * double(x(t, j));
      logits[e] = acc;
    }
    double mx = logits[0];
    for (double v : logits) mx = std::max(mx, v);
    std::vector<double> p(E);
    double sum = 0;
    for (Index e = 0; e < E; ++e) sum += (p[e] = std::exp(logits[e] - mx));
    for (auto& v : p) v /= sum;
    // Selection by repeated argmax; strict > keeps the lower id on ties.
    std::vector<Index> ids;
    std::vector<bool> taken(E, false);
    for (Index s = 0; s < k; ++s) {
      Index best = -1;
      for (Index e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = true;
      ids.push_back(best);
    }
    double wsum = 0;
    for (Index e : ids) wsum += p[e];
    for (Index e : ids) {
      const double w = router.renormalize() ? p[e] / wsum : p[e];
      const auto w1 = bank.w1(e);
      const auto w2 = bank.w2(e);
      for (Index i = 0; i < ff; ++i) {
        double a = 0;
        for (Index j = 0; j < d; ++j) a += double(w1(i, j)) * double(x(t, j));
        h[i] = act(a);
        if constexpr (Bank::gated) {
          const auto w3 = bank.w3(e);
          double b = 0;
          for (Index j = 0; j < d; ++j) b += double(w3(i, j)) * double(x(t, j));
          h[i] *= b;
        }
      }
      for (Index o = 0; o < d; ++o) {
        double a = 0;
        for (Index i = 0; i < ff; ++i) a += double(w2(o, i)) * h[i];
        y(t, o) += w * a;
      }
    }
    if (chosen) (*chosen)[static_cast<std::size_t>(t)] = ids;
  }
  return y;
}

}  // namespace moe::reference
