#pragma once
// Training steps on the mixture-of-regimes task (regimes.hpp) in double, shared by the experiments that train
// layers on it: a random batch of the training set, one AdamW step (gradient norm clipped to 10) over the layer or over
// a group of its parameters (moe::optim::ParameterGroup), and the held-out MSE.

#include <numeric>

#include <moe/moe.hpp>

#include "loss.hpp"
#include "regimes.hpp"

namespace moe::examples {

/// Fills x and target with a random batch of rows of `train`.
inline void draw_batch(const Regimes& train, Rng& rng, RowMatrix<double>& x, RowMatrix<double>& target) {
  for (Index t = 0; t < x.rows(); ++t) {
    const Index i = rng.below(train.x.rows());
    x.row(t) = train.x.row(i);
    target.row(t) = train.target.row(i);
  }
}

struct StepResult {
  double loss;    // batch MSE
  double active;  // mean experts per token the forward used
};

/// One AdamW step of `params` (the layer, or a ParameterGroup of it) on a batch of `layer`'s MSE.
template <class Layer, class Params>
StepResult train_step(Layer& layer, Params& params, optim::AdamW<double>& adam, TrainingContext<double>& ctx,
                      const RowMatrix<double>& x, const RowMatrix<double>& target) {
  RowMatrix<double> y(x.rows(), x.cols()), dx(x.rows(), x.cols()), dy;
  layer.zero_grad();
  const auto routed = layer.forward(x, y, ctx);
  const double loss = mse(y, target, dy);
  const double active =
      std::accumulate(routed.experts_per_token.begin(), routed.experts_per_token.end(), 0.0) / double(x.rows());
  layer.backward(dy, dx, ctx);
  optim::clip_grad_norm(params, 10.0);
  adam.step(params);
  return {loss, active};
}

/// The layer's MSE on `test` (an inference forward).
template <class Layer>
double held_out_mse(const Layer& layer, const Regimes& test) {
  RowMatrix<double> y(test.x.rows(), test.x.cols()), dy;
  Workspace ws(layer.workspace_bytes(test.x.rows()));
  layer.forward(test.x, y, ws);
  return mse(y, test.target, dy);
}

}  // namespace moe::examples
