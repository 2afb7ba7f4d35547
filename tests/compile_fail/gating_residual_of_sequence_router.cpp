// Must fail to compile with GatingResidual's message: it adds to the logits a router routes from, so the
// inner router must route from given logits (SequenceLevel routes pooled rows and exposes none).
#include <moe/moe.hpp>

int main() {
  using R = moe::routers::GatingResidual<moe::routers::SequenceLevel<moe::routers::TopKRouter<float>>>;
  return static_cast<int>(sizeof(R));
}
