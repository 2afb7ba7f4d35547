// io/checkpoint.hpp: round trip, and every way a file can be wrong leaves the model untouched.

#include <cstdint>
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

TEST_CASE("save_checkpoint / load_checkpoint round-trip every parameter bitwise, as safetensors", "[io]") {
  auto a = make(1), b = make(2);
  REQUIRE(flatten(a) != flatten(b));
  const auto path = temp_path("roundtrip.bin");
  moe::io::save_checkpoint(a, path);
  moe::io::load_checkpoint(b, path);
  REQUIRE(flatten(a) == flatten(b));
  moe::Rng rng(3);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 9, 6);
  moe::RowMatrix<float> ya(9, 6), yb(9, 6);
  a.forward(x, ya);
  b.forward(x, yb);
  REQUIRE(ya == yb);
  // It is a safetensors file other tools read: the parameters under their names, the metadata.
  const auto file = moe::io::Safetensors::open(path);
  CHECK(file.tensor("bank0.w1").shape == std::vector<std::int64_t>{10, 6});
  CHECK(file.metadata().at("format") == "moe");
  std::remove(path.c_str());
}

TEST_CASE("load_checkpoint rejects wrong models and damaged files without touching the model", "[io][error]") {
  auto a = make(1);
  const auto path = temp_path("good.bin"), bad = temp_path("bad.bin");
  moe::io::save_checkpoint(a, path);
  const auto bytes = read_all(path);

  SECTION("every truncation") {
    auto b = make(2);
    const auto before = flatten(b);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      write_all(bad, bytes, n);
      INFO("prefix of " << n << " bytes");
      REQUIRE_THROWS_AS(moe::io::load_checkpoint(b, bad), moe::Error);
    }
    REQUIRE(flatten(b) == before);
  }
  SECTION("a damaged header length, trailing bytes, missing file") {
    auto b = make(2);
    auto broken = bytes;
    broken[7] = 'X';
    write_all(bad, broken, broken.size());
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(b, bad), Contains("header length"));
    auto longer = bytes;
    longer.push_back(0);
    write_all(bad, longer, longer.size());
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(b, bad), Contains("trailing bytes"));
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(b, temp_path("does_not_exist.bin")), Contains("cannot open"));
  }
  SECTION("another architecture or scalar type") {
    moe::MixtralMoE other({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(other, path), Contains("tensors, the model has"));
    moe::MixtralMoE wider({.d_model = 6, .d_ff = 7, .n_experts = 5, .top_k = 2});
    moe::MixtralMoE narrow({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    moe::io::save_checkpoint(narrow, bad);
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(wider, bad), Contains("bank0.w1 is (25, 6) in the file, (35, 6)"));
    moe::MixtralMoEType<double> as_double({.d_model = 6, .d_ff = 5, .n_experts = 5, .top_k = 2});
    REQUIRE_THROWS_WITH(moe::io::load_checkpoint(as_double, bad), Contains("4-byte elements in the file, 8"));
  }
  std::remove(path.c_str());
  std::remove(bad.c_str());
}

TEST_CASE("A run saved at step n and resumed in fresh objects is bitwise the uninterrupted run at step 2n",
          "[io][state]") {
  // A DeepSeek-V3-style router (sigmoid scores, a selection bias learned by update_bias: state, not a
  // parameter) with a global-batch loss over two micro-batches per step, trained by AdamW.
  using Router = moe::routers::WithLosses<moe::routers::TopKRouter<float>, moe::losses::GlobalBatchLoss>;
  using Layer = moe::MoELayer<Router, moe::experts::SwiGLU<float>>;
  const moe::MoEConfig cfg{.d_model = 8, .d_ff = 12, .n_experts = 8, .top_k = 2};
  auto v3 = moe::routers::presets::deepseek_v3();
  v3.n_groups = 1;
  v3.top_k_groups = 1;
  const auto make_layer = [&](std::uint64_t seed) {
    Layer layer(Router(moe::routers::TopKRouter<float>(cfg, v3), moe::losses::GlobalBatchLoss(1e-2)),
                moe::experts::SwiGLU<float>(cfg));
    layer.init(seed);
    return layer;
  };
  const auto make_adam = [] { return moe::optim::AdamW<float>({.lr = 1e-2}); };
  // One optimizer step on the data of step s; returns the task loss.
  const auto train_step = [](Layer& layer, moe::optim::AdamW<float>& adam, int s) {
    moe::TrainingContext<float> ctx;
    double loss = 0;
    layer.zero_grad();
    std::vector<moe::Index> counts(8, 0);
    for (int micro = 0; micro < 2; ++micro) {
      moe::Rng rng(1000 + static_cast<std::uint64_t>(2 * s + micro));
      const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 16, 8);
      moe::RowMatrix<float> y(16, 8), dx(16, 8);
      const auto res = layer.forward(x, y, ctx);
      for (std::size_t e = 0; e < 8; ++e) counts[e] += res.tokens_per_expert[e];
      const moe::RowMatrix<float> dy = (y - x) * (2.0f / float(y.size()));
      loss += double((y - x).squaredNorm()) + res.aux_loss;
      layer.backward(dy, dx, ctx);
    }
    adam.step(layer);
    layer.router().inner().update_bias(counts, 1e-2);
    return loss;
  };
  const auto everything = [](Layer& layer) {
    std::vector<float> all;
    layer.visit_parameters([&](const std::string&, const moe::Parameter<float>& p) {
      all.insert(all.end(), p.data(), p.data() + p.rows() * p.cols());
    });
    layer.visit_state([&](const std::string&, auto values) { all.insert(all.end(), values.begin(), values.end()); });
    return all;
  };
  constexpr int n = 4;
  // Uninterrupted: 2n steps.
  auto straight = make_layer(5);
  auto adam = make_adam();
  std::vector<double> losses;
  for (int s = 0; s < 2 * n; ++s) losses.push_back(train_step(straight, adam, s));
  // Saved at step n, loaded into a layer built from another seed and a fresh optimizer, continued.
  const auto path = temp_path("resume.safetensors");
  {
    auto first = make_layer(5);
    auto first_adam = make_adam();
    for (int s = 0; s < n; ++s) REQUIRE(train_step(first, first_adam, s) == losses[static_cast<std::size_t>(s)]);
    moe::io::save_checkpoint(first, first_adam, path, {{"step", std::to_string(n)}});
  }
  auto resumed = make_layer(99);
  auto resumed_adam = make_adam();
  const auto metadata = moe::io::load_checkpoint(resumed, resumed_adam, path);
  CHECK(metadata.at("step") == std::to_string(n));
  CHECK(resumed_adam.steps() == n);
  for (int s = n; s < 2 * n; ++s) CHECK(train_step(resumed, resumed_adam, s) == losses[static_cast<std::size_t>(s)]);
  CHECK(everything(resumed) == everything(straight));  // weights and selection bias, bitwise
  // The file holds the optimizer too: a model-only load refuses it.
  auto model_only = make_layer(99);
  CHECK_THROWS_WITH(moe::io::load_checkpoint(model_only, path), Contains("tensors, the model has"));
  // A model-only checkpoint resumes with fresh moments: the continuation differs (the checks above can fail).
  const auto path_model = temp_path("resume_model_only.safetensors");
  {
    auto first = make_layer(5);
    auto first_adam = make_adam();
    for (int s = 0; s < n; ++s) train_step(first, first_adam, s);
    moe::io::save_checkpoint(first, path_model);
  }
  auto fresh_adam = make_adam();
  moe::io::load_checkpoint(model_only, path_model);
  for (int s = n; s < 2 * n; ++s) train_step(model_only, fresh_adam, s);
  CHECK(everything(model_only) != everything(straight));
  std::remove(path.c_str());
  std::remove(path_model.c_str());
}
