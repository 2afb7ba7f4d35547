// Must fail to compile with SequenceLevel's message: a gating residual (per-token logits of the previous
// layer) cannot be applied to one pooled row per sequence, so Stack would have to skip it silently.
#include <moe/moe.hpp>

int main() {
  using Residual = moe::routers::WithLosses<moe::routers::GatingResidual<moe::routers::TopKRouter<float>>,
                                            moe::losses::SwitchLoss>;
  return static_cast<int>(sizeof(moe::routers::SequenceLevel<Residual>));
}
