#pragma once
// Trains a moe::Stack on fresh batches from a domain generator (examples/common/domains.hpp): AdamW 3e-3,
// gradient norm clipped to 1, the task loss written to a loss CSV every 10 steps (scripts/plot.py plots it).

#include <fstream>
#include <string>

#include <moe/moe.hpp>

#include "common/domains.hpp"
#include "common/loss.hpp"

namespace moe::examples {

template <class Stack, class T>
void train_stack(Stack& stack, const DomainGenerator<T>& data, long steps, Index batch_sequences, Index length,
                 const std::string& name, std::uint64_t seed, std::ofstream& loss_csv) {
  optim::AdamW<T> adam({.lr = 3e-3, .weight_decay = 0});
  StackContext<T> ctx;
  RowMatrix<T> y, dx, dy;
  train_loop({.steps = steps, .seed = seed, .label = name}, [&](long step, Rng& rng) {
    const auto batch = data.sample(batch_sequences, length, rng);
    y.resize(batch.x.rows(), batch.x.cols());
    dx.resizeLike(y);
    stack.zero_grad();
    const double aux = stack.forward(batch.x, y, ctx);
    const double loss = mse(y, batch.target, dy);
    stack.backward(dy, dx, ctx);
    optim::clip_grad_norm(stack, 1.0);
    adam.step(stack);
    if ((step + 1) % 10 == 0) loss_csv << name << ',' << step + 1 << ',' << loss << '\n';
    return StepReport{loss, aux, batch.x.rows()};
  });
}

}  // namespace moe::examples
