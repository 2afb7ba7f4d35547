#pragma once
// Switch Transformer's load-balancing loss (arXiv 2101.03961 eq. 4; PAPERS.md A.5) for the top-1 examples,
// computed next to the layer from the router's public gate W_g, since the library has no balance loss yet
// (issue 5): L = alpha E sum_i f_i P_i over the rows the router saw (tokens, or sequence means), with f_i the
// share of rows whose top-1 is expert i and P_i the mean softmax probability of expert i. f is piecewise
// constant in W_g, so only P carries gradient: dL/dz_t = alpha E / n * p_t * (f - <f, p_t>).

#include <span>
#include <string_view>
#include <utility>

#include <moe/moe.hpp>

namespace moe::examples {

/// The router's gate parameter W_g (n_experts, d_model) ("gate", its only parameter).
template <class Router>
Parameter<double>& gate_of(Router& router) {
  Parameter<double>* gate = nullptr;
  router.visit_parameters([&](std::string_view, Parameter<double>& p) { gate = &p; });
  return *gate;
}

/// Adds alpha * (Switch balance loss) of rows x (n, d_model) routed to top1 (n) to the gradient of `gate`;
/// returns the scaled loss.
inline double switch_balance_loss(const RowMatrix<double>& x, std::span<const Index> top1, Parameter<double>& gate,
                                  double alpha) {
  const ConstMatrixView<double> w = std::as_const(gate).value();
  const Index n = x.rows(), n_experts = w.rows();
  const Eigen::Map<const RowMatrix<double>> wg(w.data(), n_experts, w.cols());
  RowMatrix<double> p = x * wg.transpose();  // (n, n_experts) logits, then probabilities
  for (Index t = 0; t < n; ++t) {
    p.row(t).array() -= p.row(t).maxCoeff();
    p.row(t) = p.row(t).array().exp().matrix();
    p.row(t) /= p.row(t).sum();
  }
  Eigen::RowVectorXd f = Eigen::RowVectorXd::Zero(n_experts);
  for (Index e : top1) f(e) += 1.0 / double(n);
  const Eigen::RowVectorXd mean_p = p.colwise().mean();
  RowMatrix<double> dz(n, n_experts);
  const double scale = alpha * double(n_experts) / double(n);
  for (Index t = 0; t < n; ++t) dz.row(t) = scale * p.row(t).cwiseProduct((f.array() - p.row(t).dot(f)).matrix());
  Eigen::Map<RowMatrix<double>>(gate.grad().data(), n_experts, w.cols()) += dz.transpose() * x;
  return alpha * double(n_experts) * f.dot(mean_p);
}

}  // namespace moe::examples
