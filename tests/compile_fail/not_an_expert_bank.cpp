// Must fail to compile with MoELayer's message: an int is not an expert bank.
#include <moe/moe.hpp>

int main() {
  moe::MoELayer<moe::routers::TopKSoftmax<float>, int>* layer = nullptr;
  return layer != nullptr ? layer->top_k() : 0;
}
