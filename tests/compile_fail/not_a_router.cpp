// Must fail to compile with MoELayer's message: a type without route() is not a router.
#include <moe/moe.hpp>

struct NotARouter {
  using Scalar = float;
};

int main() {
  moe::MoELayer<NotARouter, moe::experts::SwiGLU<float>>* layer = nullptr;
  return layer != nullptr ? layer->top_k() : 0;
}
