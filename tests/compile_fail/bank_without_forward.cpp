// Must fail to compile with MoELayer's message: a type with the bank's accessors but no forward() is not
// an expert bank.
#include <moe/moe.hpp>

struct BankWithoutForward {
  using Scalar = float;
  moe::Index d_model() const { return 8; }
  moe::Index n_experts() const { return 2; }
};

int main() {
  moe::MoELayer<moe::routers::TopKSoftmax<float>, BankWithoutForward>* layer = nullptr;
  return layer != nullptr ? layer->top_k() : 0;
}
