// Must fail to compile with WithLosses' message: expert-choice routing exposes no balance columns per token.
#include <moe/moe.hpp>

int main() {
  using R = moe::routers::WithLosses<moe::routers::ExpertChoiceRouter<float>, moe::losses::SwitchLoss>;
  return static_cast<int>(sizeof(R));
}
