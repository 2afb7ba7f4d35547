// routers::SequenceLevel: whole sequences routed by their mean token (Hecto), in a layer.

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

using Inner = moe::routers::TopKSoftmax<double>;
using Seq = moe::routers::SequenceLevel<Inner>;
using SeqLayer = moe::MoELayer<Seq, moe::experts::SwiGLU<double>>;

SeqLayer make(std::uint64_t seed) {
  const moe::MoEConfig cfg{.d_model = 6, .d_ff = 5, .n_experts = 4, .top_k = 2};
  SeqLayer layer{Seq(Inner(cfg)), moe::experts::SwiGLU<double>(cfg)};
  layer.init(seed);
  return layer;
}

}  // namespace

TEST_CASE("SequenceLevel gives every token of a sequence the choice made for the sequence's mean", "[router]") {
  auto layer = make(3);
  moe::Rng rng(4);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 11, 6);
  const std::vector<Index> starts = {0, 4, 5};  // sequences of 4, 1 and 6 tokens
  RowMatrix<double> y(11, 6);
  moe::Workspace ws;
  const auto res = layer.forward(x, y, ws, starts);
  const std::vector<std::pair<Index, Index>> seqs = {{0, 4}, {4, 5}, {5, 11}};
  for (const auto& [b, e] : seqs) {
    // The inner router on the mean token.
    RowMatrix<double> mean = x.middleRows(b, e - b).colwise().mean();
    std::vector<Index> ids(2);
    std::vector<double> w(2), saved(4);
    moe::Workspace scratch;
    moe::Arena arena(scratch);
    layer.router().inner().route(mean, ids.data(), w.data(), saved.data(), arena);
    for (Index t = b; t < e; ++t)
      for (Index s = 0; s < 2; ++s) {
        REQUIRE(res.expert_ids[static_cast<std::size_t>(2 * t + s)] == ids[static_cast<std::size_t>(s)]);
        REQUIRE(res.expert_weights[static_cast<std::size_t>(2 * t + s)] == w[static_cast<std::size_t>(s)]);
      }
  }

  // Without sequences it is the inner router, bit for bit.
  moe::MixtralMoEType<double> plain({.d_model = 6, .d_ff = 5, .n_experts = 4, .top_k = 2});
  plain.router() = layer.router().inner();
  plain.bank<0>() = layer.bank<0>();
  RowMatrix<double> y_seq(11, 6), y_plain(11, 6);
  layer.forward(x, y_seq);
  plain.forward(x, y_plain);
  REQUIRE(y_seq == y_plain);
}

TEST_CASE("SequenceLevel backward through the mean token matches finite differences", "[router][grad]") {
  auto layer = make(9);
  moe::Rng rng(2);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 9, 6);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, 9, 6);
  const std::vector<Index> starts = {0, 3, 7};
  // Away from top-k boundaries: the 2nd and 3rd logits of every sequence's mean differ by >= 1e-3.
  for (const auto& [b, e] : std::vector<std::pair<Index, Index>>{{0, 3}, {3, 7}, {7, 9}}) {
    const Eigen::RowVectorXd mean = x.middleRows(b, e - b).colwise().mean();
    const auto g = layer.router().inner().gate();
    std::vector<double> z;
    for (Index k = 0; k < 4; ++k) z.push_back(mean.dot(Eigen::Map<const Eigen::RowVectorXd>(g.row(k), 6)));
    std::sort(z.begin(), z.end(), std::greater<>());
    REQUIRE(z[1] - z[2] >= 1e-3);
  }
  moe::TrainingContext<double> ctx;
  moe::Workspace ws;
  RowMatrix<double> y(9, 6), dx(9, 6);
  layer.forward(x, y, ctx, starts);
  layer.zero_grad();
  layer.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(9, 6);
    layer.forward(x, out, ws, starts);
    return (out.array() * r.array()).sum();
  };
  moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  double gate = 0;
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    const auto st = moe::test::check_gradient(name, p, loss, 40);
    if (name == "router.gate") gate = st.max_abs_numeric;
  });
  REQUIRE(gate > 1e-4);  // the routing path carries gradient (top-2, renormalised)
}

TEST_CASE("SequenceLevel over WithLosses returns the losses of the sequence means from the layer's forward",
          "[router]") {
  // The loss gradient was always applied; its value (and the training flag) must reach ForwardResult too.
  using Balanced = moe::routers::WithLosses<moe::routers::TopKRouter<double>, moe::losses::SwitchLoss>;
  const moe::MoEConfig cfg{.d_model = 6, .d_ff = 5, .n_experts = 4, .top_k = 1};
  moe::MoELayer<moe::routers::SequenceLevel<Balanced>, moe::experts::SwiGLU<double>> layer{
      moe::routers::SequenceLevel<Balanced>(Balanced(moe::routers::TopKRouter<double>(cfg, {.renormalize = false}),
                                                     moe::losses::SwitchLoss{.coeff = 0.1})),
      moe::experts::SwiGLU<double>(cfg)};
  layer.init(6);
  moe::Rng rng(7);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 12, 6);
  const std::vector<Index> starts = {0, 2, 7, 8};
  RowMatrix<double> means(4, 6), y(12, 6);
  for (Index q = 0; q < 4; ++q) {
    const Index b = starts[static_cast<std::size_t>(q)], e = q + 1 < 4 ? starts[static_cast<std::size_t>(q + 1)] : 12;
    means.row(q) = x.middleRows(b, e - b).colwise().mean();
  }
  // The inner router alone on the means, as a token layer.
  moe::MoELayer<Balanced, moe::experts::SwiGLU<double>> on_means{layer.router().inner(), layer.bank<0>()};
  RowMatrix<double> y_means(4, 6);
  moe::Workspace ws;
  const double expected = on_means.forward(means, y_means, ws).aux_loss;
  REQUIRE(expected > 0);
  const auto res = layer.forward(x, y, ws, starts);
  REQUIRE(res.n_aux_losses == 1);
  REQUIRE(res.aux_loss == expected);
  moe::TrainingContext<double> ctx;
  REQUIRE(layer.forward(x, y, ctx, starts).aux_loss == expected);
}
