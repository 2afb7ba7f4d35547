// routers::SequenceLevel: whole sequences routed by their mean token (Hecto), in a layer.

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/gradcheck.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"
#include "support/routing.hpp"

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

// Each sequence's mean token the way SequenceLevel pools (its documented order): the tokens summed in token
// order, then divided by their count. Not Eigen's colwise().mean(), whose summation order depends on the
// vector width (AVX-512 and AVX2 give different last bits).
RowMatrix<double> pooled_means(const RowMatrix<double>& x, const std::vector<std::pair<Index, Index>>& seqs) {
  RowMatrix<double> means(static_cast<Index>(seqs.size()), x.cols());
  for (std::size_t q = 0; q < seqs.size(); ++q) {
    const auto [b, e] = seqs[q];
    for (Index j = 0; j < x.cols(); ++j) {
      double sum = 0;
      for (Index t = b; t < e; ++t) sum += x(t, j);
      means(static_cast<Index>(q), j) = sum / static_cast<double>(e - b);
    }
  }
  return means;
}

}  // namespace

TEST_CASE("SequenceLevel gives every token of a sequence the choice made for the sequence's mean", "[router]") {
  auto layer = make(3);
  moe::Rng rng(4);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 11, 6);
  const std::vector<Index> starts = {0, 4, 5};  // sequences of 4, 1 and 6 tokens
  const std::vector<std::pair<Index, Index>> seqs = {{0, 4}, {4, 5}, {5, 11}};
  RowMatrix<double> y(11, 6);
  moe::Workspace ws;
  const auto res = layer.forward(x, y, ws, starts);

  // Bitwise, on any build: the inner router on the (3, d_model) means pooled in the library's order is the
  // code path SequenceLevel runs.
  const RowMatrix<double> means = pooled_means(x, seqs);
  const auto inner = moe::test::route(layer.router().inner(), means);
  const std::vector<Index>& ids = inner.ids;
  const std::vector<double>& w = inner.weights;
  for (std::size_t q = 0; q < seqs.size(); ++q)
    for (Index t = seqs[q].first; t < seqs[q].second; ++t)
      for (std::size_t s = 0; s < 2; ++s) {
        const auto slot = static_cast<std::size_t>(2 * t) + s;
        REQUIRE(res.expert_ids[slot] == ids[2 * q + s]);
        REQUIRE(res.expert_weights[slot] == w[2 * q + s]);
      }

  // Across builds (summation order, FMA): an independent long double reference of mean -> logits -> softmax
  // over the two chosen logits (= Mixtral's renormalised top-2). Error of the library's weights, derived:
  //  - mean of n tokens (n - 1 additions, one division): |dm_j| <= gamma_n sum_t |x_tj| / n;
  //  - logit z_e = m . g_e (d = 6 terms, any order): |dz_e| <= gamma_d sum_j |g_ej| (|m_j| + dm_j) + sum_j |g_ej| dm_j;
  //  - the weight w = 1 / (1 + exp(z_b - z_a)) moves by at most 2 w (1 - w) e^(2D) D, D = max |dz| of the two;
  //  - softmax_row f64 is within 1e-14 relative of the double reference softmax (kernels/softmax_test), itself
  //    within (E + 3) u of the exact one; renormalising divides by a 2-term sum: 2 (1e-14 + 7u) + 3u < 3e-14.
  // The ids must match wherever the reference's 2nd and 3rd logits are further apart than their two error
  // bounds plus 3e-14 (what the chosen probabilities' 1e-14 relative errors could reverse): checked.
  const auto g = layer.router().inner().gate();  // (n_experts, d_model)
  for (std::size_t q = 0; q < seqs.size(); ++q) {
    const auto [b, e] = seqs[q];
    const auto n = static_cast<double>(e - b);
    std::vector<long double> m(6);
    std::vector<double> dm(6);
    for (Index j = 0; j < 6; ++j) {
      long double sum = 0;
      double abs_sum = 0;
      for (Index t = b; t < e; ++t) {
        sum += x(t, j);
        abs_sum += std::abs(x(t, j));
      }
      m[static_cast<std::size_t>(j)] = sum / (e - b);
      dm[static_cast<std::size_t>(j)] = moe::test::gamma_n<double>(n) * abs_sum / n;
    }
    std::vector<long double> z(4);
    std::vector<double> dz(4);
    for (Index k = 0; k < 4; ++k) {
      long double acc = 0;
      double bound = 0;
      for (Index j = 0; j < 6; ++j) {
        const auto jj = static_cast<std::size_t>(j);
        acc += m[jj] * g(k, j);
        bound += moe::test::gamma_n<double>(6) * std::abs(g(k, j)) * (std::abs(static_cast<double>(m[jj])) + dm[jj]) +
                 std::abs(g(k, j)) * dm[jj];
      }
      z[static_cast<std::size_t>(k)] = acc;
      dz[static_cast<std::size_t>(k)] = bound;
    }
    std::vector<std::size_t> order = {0, 1, 2, 3};  // descending logits, lower id first on ties
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t c) { return z[a] > z[c]; });
    const double D = std::max(dz[order[0]], dz[order[1]]);
    INFO("sequence " << q);
    REQUIRE(static_cast<double>(z[order[1]] - z[order[2]]) > dz[order[1]] + dz[order[2]] + 3e-14);  // no near-tie
    const long double wa = 1.0L / (1.0L + std::exp(z[order[1]] - z[order[0]]));
    const std::vector<long double> ref_w = {wa, 1.0L - wa};
    for (std::size_t s = 0; s < 2; ++s) {
      const auto slot = static_cast<std::size_t>(2 * b) + s;
      REQUIRE(res.expert_ids[slot] == static_cast<Index>(order[s]));
      const double wr = static_cast<double>(ref_w[s]);
      const double bound = 2 * wr * (1 - wr) * std::exp(2 * D) * D + 3e-14 * wr;
      CHECK(std::abs(res.expert_weights[slot] - wr) <= bound);
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
  // The means pooled in the library's order (bitwise the rows the inner router sees, on any build).
  const RowMatrix<double> means = pooled_means(x, {{0, 2}, {2, 7}, {7, 8}, {8, 12}});
  RowMatrix<double> y(12, 6);
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
