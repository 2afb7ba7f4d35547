// models/hugging_face.hpp against PyTorch: tests/data/hf/<arch>/ holds a tiny Hugging-Face-named checkpoint, its
// config.json and the HF block's outputs on a fixed input (scripts/make_hf_fixtures.py, torch in f32 and f64).
// Loading must reproduce the ids exactly and the outputs to 1e-12 (double) / 1e-5 (float); saving must write
// what loading reads; every bad folder gets an error naming the file and the key or tensor.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/models/hugging_face.hpp>

namespace {

using Catch::Matchers::Contains;
using moe::Index;
namespace fs = std::filesystem;
namespace models = moe::models;

const fs::path data_dir = fs::path(MOE_TEST_DATA) / "hf";
const std::vector<std::string> fixtures = {"mixtral",          "mixtral_bf16", "qwen2_moe",
                                           "qwen3_moe",        "olmoe",        "deepseek_v2",
                                           "deepseek_v2_lite", "deepseek_v3",  "switch_transformers"};

struct Expected {
  Index layer = 0;
  Index n_tokens = 0, d_model = 0, k = 0;
  std::vector<double> x, weights, y_f64;
  std::vector<float> y_f32;
  std::vector<std::int64_t> ids;
};

Expected expected(const std::string& name) {
  const auto f = moe::io::Safetensors::open(data_dir / name / "expected.safetensors");
  Expected e;
  e.layer = std::stol(f.metadata().at("layer"));
  e.n_tokens = f.tensor("x").shape[0];
  e.d_model = f.tensor("x").shape[1];
  e.k = f.tensor("ids").shape[1];
  const auto read = [&](const char* tensor, auto& out) {
    out.resize(static_cast<std::size_t>(f.tensor(tensor).numel()));
    f.read(tensor, std::span(out));
  };
  read("x", e.x);
  read("weights", e.weights);
  read("y_f64", e.y_f64);
  read("y_f32", e.y_f32);
  read("ids", e.ids);
  return e;
}

struct Run {
  std::vector<Index> ids;
  std::vector<double> weights, y;
};

// The block's forward on the fixture's input, in T.
template <class T, class Storage>
Run run(const models::HFMoELayer<T, Storage>& loaded, const Expected& e) {
  moe::RowMatrix<T> x(e.n_tokens, e.d_model), y(e.n_tokens, e.d_model);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(e.x[static_cast<std::size_t>(i)]);
  moe::Workspace ws;
  Run r;
  std::visit(
      [&](const auto& layer) {
        const auto res = layer.forward(x, y, ws);
        r.ids.assign(res.expert_ids.begin(), res.expert_ids.end());
        r.weights.assign(res.expert_weights.begin(), res.expert_weights.end());
      },
      loaded);
  r.y.assign(y.data(), y.data() + y.size());
  return r;
}

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

// A scratch copy of a fixture folder, to break.
fs::path scratch_copy(const std::string& name, const std::string& tag) {
  const fs::path dir = fs::temp_directory_path() / ("moe_hf_test_" + tag);
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(data_dir / name))
    fs::copy_file(entry.path(), dir / entry.path().filename());
  return dir;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}
void write_json(const fs::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2);
}

}  // namespace

TEST_CASE("Each Hugging Face MoE block loads and matches PyTorch: ids exactly, outputs to 1e-12 / 1e-5",
          "[models][hf]") {
  for (const std::string& name : fixtures) {
    INFO("fixture " << name);
    const Expected e = expected(name);
    const auto in_double = models::load_hf_moe_layer<double>(data_dir / name, e.layer);
    const Run d = run(in_double, e);
    REQUIRE(std::equal(d.ids.begin(), d.ids.end(), e.ids.begin(), e.ids.end()));
    const double weight_error = max_abs_diff(d.weights, e.weights), error64 = max_abs_diff(d.y, e.y_f64);
    const auto in_float = models::load_hf_moe_layer<float>(data_dir / name, e.layer);
    const Run f = run(in_float, e);
    REQUIRE(std::equal(f.ids.begin(), f.ids.end(), e.ids.begin(), e.ids.end()));
    const double error32 = max_abs_diff(f.y, e.y_f32);
    WARN(name << ": max |y - torch| f64 " << error64 << ", f32 " << error32 << "; weights f64 " << weight_error);
    CHECK(weight_error <= 1e-12);
    CHECK(error64 <= 1e-12);
    CHECK(error32 <= 1e-5);
    // The fixture is not trivial: the output is far from zero, so the errors above could have been large.
    CHECK(max_abs_diff(e.y_f64, std::vector<double>(e.y_f64.size(), 0.0)) > 0.1);
  }
}

TEST_CASE("PackedOnly storage loads every fixture with bitwise the outputs of the trainable layer", "[models][hf]") {
  for (const std::string& name : fixtures) {
    INFO("fixture " << name);
    const Expected e = expected(name);
    const Run native = run(models::load_hf_moe_layer<float>(data_dir / name, e.layer), e);
    const Run packed = run(models::load_hf_moe_layer<float, moe::kernels::PackedOnly<moe::kernels::NativeWeights>>(
                               data_dir / name, e.layer),
                           e);
    CHECK(native.ids == packed.ids);
    CHECK(native.y == packed.y);
  }
}

TEST_CASE("read_hf_config builds the architecture's router from config.json", "[models][hf]") {
  const auto v3 = models::read_hf_config(data_dir / "deepseek_v3");
  REQUIRE(v3.architecture->model_type == "deepseek_v3");
  CHECK(v3.router.score == moe::routers::ScoreFunction::sigmoid);
  CHECK(v3.router.selection_bias);
  CHECK(v3.router.n_groups == v3.json.at("n_group").get<Index>());
  CHECK(v3.router.group_score_top == 2);
  CHECK(v3.router.routed_scaling_factor == v3.json.at("routed_scaling_factor").get<double>());
  CHECK(v3.shared_d_ff == v3.json.at("n_shared_experts").get<Index>() * v3.routed.d_ff);
  CHECK(!v3.is_moe_layer(0));  // first_k_dense_replace = 1
  CHECK(v3.is_moe_layer(1));
  const auto lite = models::read_hf_config(data_dir / "deepseek_v2_lite");
  CHECK(lite.router.n_groups == 1);
  CHECK(!lite.router.renormalize);
  const auto qwen = models::read_hf_config(data_dir / "qwen2_moe");
  CHECK(qwen.shared_d_ff == qwen.json.at("shared_expert_intermediate_size").get<Index>());
  CHECK(qwen.router.renormalize == qwen.json.at("norm_topk_prob").get<bool>());
  const auto sw = models::read_hf_config(data_dir / "switch_transformers");
  CHECK(sw.routed.top_k == 1);
  CHECK(std::holds_alternative<moe::SwitchMoEType<float>>(models::make_hf_moe_layer<float>(sw)));
  CHECK(std::holds_alternative<moe::Qwen2MoEType<float>>(models::make_hf_moe_layer<float>(qwen)));
  CHECK(std::holds_alternative<moe::DeepSeekMoEType<float>>(models::make_hf_moe_layer<float>(v3)));
}

TEST_CASE("save_hf_moe_layer writes what load_hf_moe_layer reads, bit for bit", "[models][hf]") {
  for (const std::string name : {"qwen2_moe", "deepseek_v3", "switch_transformers"}) {
    INFO("fixture " << name);
    const Expected e = expected(name);
    const auto c = models::read_hf_config(data_dir / name);
    const auto loaded = models::load_hf_moe_layer<double>(data_dir / name, e.layer);
    const fs::path dir = scratch_copy(name, "save_" + name);
    std::visit([&](const auto& layer) { models::save_hf_moe_layer(dir / "model.safetensors", layer, c, e.layer); },
               loaded);
    const auto written = moe::io::Safetensors::open(dir / "model.safetensors");
    const auto original = moe::io::Safetensors::open(data_dir / name / "model.safetensors");
    // Every tensor of the block is written under its HF name (the fixture also holds others, e.g. embeddings).
    for (const auto& t : written.tensors()) {
      INFO(t.name);
      REQUIRE(original.find(t.name) != nullptr);
      CHECK(original.tensor(t.name).shape == t.shape);
    }
    const Run a = run(loaded, e), b = run(models::load_hf_moe_layer<double>(dir, e.layer), e);
    CHECK(a.ids == b.ids);
    CHECK(a.y == b.y);
  }
}

TEST_CASE("A sharded checkpoint (model.safetensors.index.json) loads like a single file", "[models][hf]") {
  const std::string name = "mixtral";
  const Expected e = expected(name);
  const auto c = models::read_hf_config(data_dir / name);
  const fs::path dir = scratch_copy(name, "sharded");
  const auto original = moe::io::Safetensors::open(data_dir / name / "model.safetensors");
  // Two shards: the router in one, the experts in the other.
  std::vector<moe::io::TensorToWrite> shard[2];
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (const auto& t : original.tensors()) {
    const int s = t.name.find("experts") == std::string::npos ? 0 : 1;
    shard[s].push_back({.name = t.name, .dtype = t.dtype, .shape = t.shape, .data = t.data});
    index["weight_map"][t.name] = "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors";
  }
  for (int s = 0; s < 2; ++s)
    moe::io::save_safetensors(dir / ("model-0000" + std::to_string(s + 1) + "-of-00002.safetensors"), shard[s]);
  fs::remove(dir / "model.safetensors");
  write_json(dir / "model.safetensors.index.json", index);
  const Run a = run(models::load_hf_moe_layer<double>(data_dir / name, e.layer), e);
  const Run b = run(models::load_hf_moe_layer<double>(dir, e.layer), e);
  CHECK(a.ids == b.ids);
  CHECK(a.y == b.y);
  (void)c;
}

TEST_CASE("Bad Hugging Face folders are rejected naming the file and the key or tensor", "[models][hf][bad_input]") {
  const Expected e = expected("deepseek_v3");
  SECTION("an unsupported model_type lists the supported ones") {
    const fs::path dir = scratch_copy("mixtral", "gpt_oss");
    auto j = read_json(dir / "config.json");
    j["model_type"] = "gpt_oss";
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(
        models::load_hf_moe_layer<float>(dir, 0),
        Contains("config.json") && Contains("\"gpt_oss\" is not supported") &&
            Contains("mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, switch_transformers"));
  }
  SECTION("a missing key is an error, not a default") {
    const fs::path dir = scratch_copy("qwen2_moe", "no_norm");
    auto j = read_json(dir / "config.json");
    j.erase("norm_topk_prob");
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(models::read_hf_config(dir),
                        Contains("config.json") && Contains("lacks the key \"norm_topk_prob\""));
  }
  SECTION("an unsupported activation or topk_method") {
    const fs::path dir = scratch_copy("deepseek_v3", "gelu");
    auto j = read_json(dir / "config.json");
    j["hidden_act"] = "gelu";
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(models::read_hf_config(dir), Contains("\"hidden_act\" is \"gelu\""));
    j["hidden_act"] = "silu";
    j["topk_method"] = "sinkhorn";
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(models::read_hf_config(dir), Contains("\"topk_method\" is \"sinkhorn\""));
  }
  SECTION("a dense layer is not a MoE block") {
    REQUIRE_THROWS_WITH(models::load_hf_moe_layer<float>(data_dir / "deepseek_v3", 0),
                        Contains("layer 0") && Contains("not a MoE block"));
    REQUIRE_THROWS_WITH(models::load_hf_moe_layer<float>(data_dir / "deepseek_v3", 99), Contains("layer 99"));
  }
  SECTION("a config wider than the tensors: the tensor and both shapes are named") {
    const fs::path dir = scratch_copy("deepseek_v3", "wide");
    auto j = read_json(dir / "config.json");
    j["moe_intermediate_size"] = j["moe_intermediate_size"].get<Index>() + 1;
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(
        models::load_hf_moe_layer<float>(dir, e.layer),
        Contains("model.safetensors") && Contains("mlp.experts.0.gate_proj.weight") && Contains("implies"));
  }
  SECTION("more experts in the config than in the file: the missing tensor is named") {
    const fs::path dir = scratch_copy("mixtral", "more_experts");
    const Index layer = expected("mixtral").layer;
    auto j = read_json(dir / "config.json");
    const Index n = j["num_local_experts"].get<Index>();
    j["num_local_experts"] = n + 1;
    write_json(dir / "config.json", j);
    REQUIRE_THROWS_WITH(models::load_hf_moe_layer<float>(dir, layer),
                        Contains("block_sparse_moe.gate.weight") && Contains("(" + std::to_string(n + 1) + ", "));
  }
  SECTION("a non-finite weight is named; no folder: neither file is found") {
    const fs::path dir = scratch_copy("mixtral", "nan");
    const Expected m = expected("mixtral");
    auto layer = models::load_hf_moe_layer<float>(data_dir / "mixtral", m.layer);
    const auto c = models::read_hf_config(dir);
    std::get<moe::SwiGLUMoEType<float>>(layer).bank<0>().w2(3)(1, 2) = std::nanf("");
    std::visit([&](const auto& l) { models::save_hf_moe_layer(dir / "model.safetensors", l, c, m.layer); }, layer);
    REQUIRE_THROWS_WITH(models::load_hf_moe_layer<float>(dir, m.layer),
                        Contains("experts.3.w2.weight") && Contains("is nan"));
    fs::remove(dir / "model.safetensors");
    REQUIRE_THROWS_WITH(models::load_hf_moe_layer<float>(dir, m.layer), Contains("neither model.safetensors"));
  }
}
