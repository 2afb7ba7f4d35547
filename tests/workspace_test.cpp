// Workspace and Arena (include/moe/workspace.hpp).

#include <cstdint>

#include <catch2/catch.hpp>
#include <moe/workspace.hpp>

using Catch::Matchers::Contains;

TEST_CASE("Workspace grows only when asked for more", "[workspace]") {
  moe::Workspace ws;
  REQUIRE(ws.capacity() == 0);
  ws.reserve(1000);
  REQUIRE(ws.capacity() == 1000);
  REQUIRE(ws.allocations() == 1);
  REQUIRE(reinterpret_cast<std::uintptr_t>(ws.data()) % moe::k_workspace_alignment == 0);
  ws.reserve(10);
  ws.reserve(1000);
  REQUIRE(ws.allocations() == 1);
  ws.reserve(1001);
  REQUIRE(ws.allocations() == 2);
  REQUIRE(ws.capacity() == 1001);
}

TEST_CASE("Arena aligns every buffer and measures what it hands out", "[workspace]") {
  moe::Arena measure;
  REQUIRE(measure.measuring());
  REQUIRE(measure.take<float>(3) == nullptr);
  REQUIRE(measure.take<double>(5) == nullptr);
  const std::size_t need = measure.peak();
  REQUIRE(need == 64 + 5 * sizeof(double));

  moe::Workspace ws(need);
  moe::Arena arena(ws);
  float* a = arena.take<float>(3);
  double* b = arena.take<double>(5);
  REQUIRE(reinterpret_cast<std::uintptr_t>(a) % 64 == 0);
  REQUIRE(reinterpret_cast<std::uintptr_t>(b) % 64 == 0);
  REQUIRE(reinterpret_cast<std::byte*>(b) - reinterpret_cast<std::byte*>(a) == 64);
  REQUIRE(arena.used() == need);
  REQUIRE_THROWS_WITH(arena.take<char>(1), Contains("too small"));
}

TEST_CASE("Arena rewind shares scratch between stages and peak remembers the largest", "[workspace]") {
  moe::Arena arena;
  arena.take<char>(100);
  const std::size_t mark = arena.used();
  arena.take<char>(1000);
  arena.rewind(mark);
  REQUIRE(arena.used() == mark);
  arena.take<char>(10);
  REQUIRE(arena.peak() == 128 + 1000);
  arena.rewind(1u << 30);  // rewinding never moves forward
  REQUIRE(arena.used() == 128 + 10);
}

TEST_CASE("An Arena over an empty Workspace is a real arena, not a measuring one", "[workspace]") {
  moe::Workspace empty;
  moe::Arena arena(empty);
  REQUIRE_FALSE(arena.measuring());
  REQUIRE(arena.take<float>(0) == nullptr);  // nothing asked, nothing needed
  REQUIRE_THROWS_WITH(arena.take<float>(1), Contains("too small"));
}
