// Must fail to compile with Shared's message: always-on experts wrap an expert bank.
#include <moe/moe.hpp>

struct NotABank {
  using Scalar = float;
};

int main() { return static_cast<int>(sizeof(moe::experts::Shared<NotABank>)); }
