// Must fail to compile with CapacityLimited's message: a type without route() is not a router to limit.
#include <moe/moe.hpp>

struct NotARouter {
  using Scalar = float;
};

int main() { return static_cast<int>(sizeof(moe::routers::CapacityLimited<NotARouter>)); }
