// io/checkpoint.hpp: round trip, and every way a file can be wrong leaves the model untouched.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using Catch::Matchers::Contains;

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moe_checkpoint_test_" + name)).string();
}

template <class Model>
std::vector<double> flatten(Model& m) {
  std::vector<double> all;
  m.visit_parameters([&](const std::string&, auto& p) {
    for (moe::Index i = 0; i < p.rows() * p.cols(); ++i) all.push_back(double(p.data()[i]));
  });
  return all;
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
void write_all(const std::string& path, const std::vector<char>& bytes, std::size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(n));
}

moe::MoEPlusPlus make(std::uint64_t seed) {
  moe::MoEPlusPlus layer(moe::routers::TopKSoftmax<float>({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2}),
                         moe::experts::SwiGLU<float>({.d_model = 6, .d_ff = 5, .n_experts = 2}),
                         moe::experts::ConstantExperts<float>(1, 6), moe::experts::CopyExperts<float>(1, 6),
                         moe::experts::ZeroExperts<float>(1, 6));
  layer.init(seed);
  return layer;
}

}  // namespace

TEST_CASE("save_parameters / load_parameters round-trip every parameter bitwise", "[io]") {
  auto a = make(1), b = make(2);
  REQUIRE(flatten(a) != flatten(b));
  const auto path = temp_path("roundtrip.bin");
  moe::io::save_parameters(a, path);
  moe::io::load_parameters(b, path);
  REQUIRE(flatten(a) == flatten(b));
  moe::Rng rng(3);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 9, 6);
  moe::RowMatrix<float> ya(9, 6), yb(9, 6);
  a.forward(x, ya);
  b.forward(x, yb);
  REQUIRE(ya == yb);
  std::remove(path.c_str());
}

TEST_CASE("load_parameters rejects wrong models and damaged files without touching the model", "[io][error]") {
  auto a = make(1);
  const auto path = temp_path("good.bin"), bad = temp_path("bad.bin");
  moe::io::save_parameters(a, path);
  const auto bytes = read_all(path);

  SECTION("every truncation") {
    auto b = make(2);
    const auto before = flatten(b);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      write_all(bad, bytes, n);
      INFO("prefix of " << n << " bytes");
      REQUIRE_THROWS_AS(moe::io::load_parameters(b, bad), moe::Error);
    }
    REQUIRE(flatten(b) == before);
  }
  SECTION("bad magic, trailing bytes, missing file") {
    auto b = make(2);
    auto broken = bytes;
    broken[0] = 'X';
    write_all(bad, broken, broken.size());
    REQUIRE_THROWS_WITH(moe::io::load_parameters(b, bad), Contains("bad magic"));
    auto longer = bytes;
    longer.push_back(0);
    write_all(bad, longer, longer.size());
    REQUIRE_THROWS_WITH(moe::io::load_parameters(b, bad), Contains("trailing bytes"));
    REQUIRE_THROWS_WITH(moe::io::load_parameters(b, temp_path("does_not_exist.bin")), Contains("cannot open"));
  }
  SECTION("another architecture or scalar type") {
    moe::MixtralMoE other({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    REQUIRE_THROWS_WITH(moe::io::load_parameters(other, path), Contains("tensors, the model has"));
    moe::MixtralMoE wider({.d_model = 6, .d_ff = 7, .n_experts = 5, .top_k = 2});
    moe::MixtralMoE narrow({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    moe::io::save_parameters(narrow, bad);
    REQUIRE_THROWS_WITH(moe::io::load_parameters(wider, bad), Contains("bank0.w1 is (25, 6) in the file, (35, 6)"));
    moe::MixtralMoEType<double> as_double({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    REQUIRE_THROWS_WITH(moe::io::load_parameters(as_double, bad), Contains("4-byte elements in the file, 8"));
  }
  std::remove(path.c_str());
  std::remove(bad.c_str());
}
