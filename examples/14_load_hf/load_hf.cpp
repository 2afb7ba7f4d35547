/// \file load_hf.cpp
/// \brief Load the MoE block of a Hugging Face checkpoint folder (config.json + model.safetensors, or shards),
/// print the architecture it recognised, run a batch through it and print the routing statistics.
///
/// Usage: load_hf [DIR] [--layer=L] [--tokens=N] [--seed=S] [--double]
///   DIR       a checkpoint folder (default: the tiny Mixtral fixture tests/data/hf/mixtral of this repository)
///   --layer   which layer's MoE block (default: the first MoE layer of the config)
///   --tokens  batch size of random N(0, 1) tokens (default 256)
///   --double  load into double instead of float
/// When DIR holds expected.safetensors (the fixtures of scripts/make_hf_fixtures.py), the block also runs on its
/// input and the output is compared with PyTorch's. Exit code 0 when the block loaded, ran, gave finite outputs
/// and (with a fixture) matched PyTorch's ids exactly and outputs within 1e-5 (float) / 1e-12 (double).

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <moe/models/hugging_face.hpp>
#include <moe/moe.hpp>

namespace {

struct Options {
  std::string dir = MOE_HF_DEFAULT_DIR;
  moe::Index layer = -1;
  moe::Index n_tokens = 256;
  std::uint64_t seed = 1;
  bool in_double = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--layer=", 0) == 0) {
      o.layer = std::stol(a.substr(8));
    } else if (a.rfind("--tokens=", 0) == 0) {
      o.n_tokens = std::stol(a.substr(9));
    } else if (a.rfind("--seed=", 0) == 0) {
      o.seed = std::stoull(a.substr(7));
    } else if (a == "--double") {
      o.in_double = true;
    } else if (a.rfind("--", 0) != 0) {
      o.dir = a;
    } else {
      std::fprintf(stderr, "unknown argument %s\nusage: load_hf [DIR] [--layer=L] [--tokens=N] [--seed=S] [--double]\n",
                   a.c_str());
      std::exit(2);
    }
  }
  return o;
}

const char* score_name(moe::routers::ScoreFunction s) {
  return s == moe::routers::ScoreFunction::sigmoid   ? "sigmoid"
         : s == moe::routers::ScoreFunction::softmax ? "softmax"
                                                     : "other";
}

template <class T>
int run(const Options& o) {
  namespace models = moe::models;
  const models::HFConfig c = models::read_hf_config(o.dir);
  moe::Index layer_index = o.layer;
  for (moe::Index l = 0; layer_index < 0 && l < c.n_layers; ++l)
    if (c.is_moe_layer(l)) layer_index = l;
  const auto& r = c.router;
  std::printf("%s: model_type %s, %ld layers, MoE block of layer %ld\n", o.dir.c_str(),
              std::string(c.architecture->model_type).c_str(), static_cast<long>(c.n_layers),
              static_cast<long>(layer_index));
  std::printf("  routed: d_model %ld, d_ff %ld, %ld experts, top-%ld; shared MLP width %ld%s\n",
              static_cast<long>(c.routed.d_model), static_cast<long>(c.routed.d_ff),
              static_cast<long>(c.routed.n_experts), static_cast<long>(c.routed.top_k),
              static_cast<long>(c.shared_d_ff), c.architecture->shared_gate.empty() ? "" : " (sigmoid-gated)");
  std::printf("  router: %s%s, renormalise %s, groups %ld keep %ld, selection bias %s, scale %g\n", score_name(r.score),
              r.softmax_after_top_k ? " after top-k" : "", r.renormalize ? "yes" : "no", static_cast<long>(r.n_groups),
              static_cast<long>(r.top_k_groups), r.selection_bias ? "yes" : "no", r.routed_scaling_factor);

  const auto t0 = std::chrono::steady_clock::now();
  const models::HFMoELayer<T> loaded = models::load_hf_moe_layer<T>(o.dir, layer_index);
  const double load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  loaded into %s in %.1f ms\n", sizeof(T) == 4 ? "float" : "double", load_ms);

  bool ok = true;
  std::visit(
      [&](const auto& layer) {
        moe::Rng rng(o.seed);
        moe::RowMatrix<T> x(o.n_tokens, layer.d_model()), y(o.n_tokens, layer.d_model());
        for (moe::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(rng.normal());
        moe::Workspace ws;
        moe::RoutingStats stats(layer);
        const auto t1 = std::chrono::steady_clock::now();
        stats.record(layer.forward(x, y, ws));
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
        for (moe::Index i = 0; i < y.size(); ++i) ok = ok && std::isfinite(static_cast<double>(y.data()[i]));
        std::printf("  %ld random tokens in %.2f ms (%.0f tokens/s); outputs finite: %s\n",
                    static_cast<long>(o.n_tokens), ms, 1e3 * static_cast<double>(o.n_tokens) / ms, ok ? "yes" : "NO");
        std::printf("  tokens per expert:");
        for (long n : stats.tokens_per_expert()) std::printf(" %ld", n);
        std::printf("\n  load entropy %.3f (1 = even), max violation %.3f, coefficient of variation %.3f\n",
                    stats.load_entropy(), stats.max_violation(), stats.coefficient_of_variation());

        const auto fixture = std::filesystem::path(o.dir) / "expected.safetensors";
        if (!std::filesystem::exists(fixture)) return;
        const auto f = moe::io::Safetensors::open(fixture);
        const auto& shape = f.tensor("x").shape;
        std::vector<double> xe(static_cast<std::size_t>(f.tensor("x").numel())), ye(xe.size());
        std::vector<std::int64_t> ids(static_cast<std::size_t>(f.tensor("ids").numel()));
        f.read("x", std::span(xe));
        f.read(sizeof(T) == 4 ? "y_f32" : "y_f64", std::span(ye));
        f.read("ids", std::span(ids));
        moe::RowMatrix<T> xf(shape[0], shape[1]), yf(shape[0], shape[1]);
        for (moe::Index i = 0; i < xf.size(); ++i) xf.data()[i] = static_cast<T>(xe[static_cast<std::size_t>(i)]);
        const auto res = layer.forward(xf, yf, ws);
        const bool same_ids = std::equal(ids.begin(), ids.end(), res.expert_ids.begin(), res.expert_ids.end());
        double err = 0;
        for (moe::Index i = 0; i < yf.size(); ++i)
          err = std::max(err, std::abs(static_cast<double>(yf.data()[i]) - ye[static_cast<std::size_t>(i)]));
        const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
        std::printf("  against PyTorch (%s): ids %s, max |y - y_torch| = %.3g (tolerance %.0e)\n", fixture.c_str(),
                    same_ids ? "identical" : "DIFFER", err, tol);
        ok = ok && same_ids && err <= tol;
      },
      loaded);
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    return o.in_double ? run<double>(o) : run<float>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load_hf: %s\n", e.what());
    return 1;
  }
}
