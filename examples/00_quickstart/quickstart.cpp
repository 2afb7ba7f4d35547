/// \file quickstart.cpp
/// \brief The smallest complete use of moe: build a Mixtral-style layer, run one forward pass, see what the
/// router did, and check the result against the plain double-precision reference.
///
/// Usage: quickstart [--preset=tiny|small|mixtral] [--tokens=N] [--seed=S]
///   tiny    d_model 64,   d_ff 128,  8 experts, top-2 (the ctest smoke test)
///   small   d_model 512,  d_ff 1024, 8 experts, top-2 (default)
///   mixtral d_model 1024, d_ff 3584, 8 experts, top-2 (Mixtral's expert count and ratio, width 1/4)
/// Exit code 0 when the layer agrees with the reference (NMSE <= 1e-7), 1 otherwise.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <moe/moe.hpp>
#include <moe/reference/naive_moe.hpp>

namespace {

struct Options {
  moe::MoEConfig cfg{.d_model = 512, .d_ff = 1024, .n_experts = 8, .top_k = 2};
  moe::Index n_tokens = 64;
  std::uint64_t seed = 42;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--preset=tiny") {
      o.cfg = {.d_model = 64, .d_ff = 128, .n_experts = 8, .top_k = 2};
    } else if (a == "--preset=small") {
      o.cfg = {.d_model = 512, .d_ff = 1024, .n_experts = 8, .top_k = 2};
    } else if (a == "--preset=mixtral") {
      o.cfg = {.d_model = 1024, .d_ff = 3584, .n_experts = 8, .top_k = 2};
    } else if (a.rfind("--tokens=", 0) == 0) {
      o.n_tokens = std::stol(a.substr(9));
    } else if (a.rfind("--seed=", 0) == 0) {
      o.seed = std::stoull(a.substr(7));
    } else {
      std::fprintf(stderr, "unknown argument %s\nusage: quickstart [--preset=tiny|small|mixtral] [--tokens=N] [--seed=S]\n",
                   a.c_str());
      std::exit(2);
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  const auto& c = opt.cfg;
  moe::MixtralMoE layer(c);
  layer.init(opt.seed);

  moe::Rng rng(opt.seed + 1);
  moe::RowMatrix<float> x(opt.n_tokens, c.d_model);  // (n_tokens, d_model)
  for (moe::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  moe::RowMatrix<float> y(opt.n_tokens, c.d_model);

  std::printf("moe %d.%d.%d quickstart: MixtralMoE d_model=%td d_ff=%td n_experts=%td top_k=%td, x is (%td, %td)\n",
              MOE_VERSION_MAJOR, MOE_VERSION_MINOR, MOE_VERSION_PATCH, c.d_model, c.d_ff, c.n_experts, c.top_k,
              x.rows(), x.cols());
  moe::Workspace ws;
  layer.forward(x, y, ws);  // first call sizes the workspace
  const auto t0 = std::chrono::steady_clock::now();
  const auto routing = layer.forward(x, y, ws);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  std::printf("experts used per token (first 4 tokens, weight in brackets):\n");
  for (moe::Index t = 0; t < std::min<moe::Index>(4, opt.n_tokens); ++t) {
    std::printf("  token %td:", t);
    for (moe::Index s = 0; s < c.top_k; ++s) {
      const auto i = static_cast<std::size_t>(t * c.top_k + s);
      std::printf(" expert %td (%.3f)", routing.expert_ids[i], static_cast<double>(routing.expert_weights[i]));
    }
    std::printf("\n");
  }
  std::printf("tokens per expert:");
  for (auto n : routing.tokens_per_expert) std::printf(" %td", n);
  const double flops = 6.0 * double(opt.n_tokens) * double(c.top_k) * double(c.d_model) * double(c.d_ff);
  std::printf("\nforward: %.3f ms (%.1f GFLOP/s of active-expert FLOPs, %d threads)\n", ms, flops / ms * 1e-6,
              moe::detail::max_threads());

  const moe::RowMatrix<double> ref = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<float>(x));
  const double err = (ref - y.cast<double>()).squaredNorm() / ref.squaredNorm();
  const bool ok = err <= 1e-7;
  std::printf("check against the double-precision reference: NMSE = %.2e (bound 1e-7) -> %s\n", err,
              ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
