// moe::Stack: whole-stack gradients (task + aux losses) against central finite differences in double for a
// 3-layer MoE++ stack with gating residuals and the τ-weighted balance loss, and for a pre-gated stack; the
// pre-gating prefetch hook sees exactly the routing each layer then uses; bitwise determinism for 1-4
// threads; clear errors.

#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"
#include "support/threads.hpp"

using moe::Index;
using moe::RowMatrix;
namespace routers = moe::routers;
namespace experts = moe::experts;
namespace losses = moe::losses;

namespace {

template <class T>
using PlusRouter = routers::WithLosses<routers::GatingResidual<routers::TopKRouter<T>>, losses::MoEPlusPlusLoss>;
template <class T>
using PlusLayer = moe::MoELayer<PlusRouter<T>, experts::SwiGLU<T>, experts::ConstantExperts<T>,
                                experts::CopyExperts<T>, experts::ZeroExperts<T>>;

// A 3-layer MoE++ stack: 3 FFN + 1 constant + 1 copy + 1 zero expert per layer, top-2, gating residuals,
// heterogeneous balance loss with τ = 0.5.
template <class T>
moe::Stack<PlusLayer<T>> moepp_stack(Index d, std::uint64_t seed) {
  std::vector<PlusLayer<T>> layers;
  for (int l = 0; l < 3; ++l)
    layers.emplace_back(
        PlusRouter<T>(routers::GatingResidual(routers::TopKRouter<T>(
                          {.d_model = d, .d_ff = 4, .n_experts = 6, .top_k = 2}, {.renormalize = false})),
                      losses::MoEPlusPlusLoss{.coeff = 0.5, .tau = 0.5}),
        experts::SwiGLU<T>({.d_model = d, .d_ff = 4, .n_experts = 3}), experts::ConstantExperts<T>(1, d),
        experts::CopyExperts<T>(1, d), experts::ZeroExperts<T>(1, d));
  moe::Stack<PlusLayer<T>> stack(std::move(layers));
  stack.init(seed);
  return stack;
}

using Mixtral = moe::MoELayer<routers::WithLosses<routers::TopKRouter<double>, losses::ZLoss>, experts::SwiGLU<double>>;

moe::Stack<Mixtral> pregated_stack(Index d, std::size_t n_layers) {
  std::vector<Mixtral> layers;
  const moe::MoEConfig cfg{.d_model = d, .d_ff = 5, .n_experts = 4, .top_k = 2};
  for (std::size_t l = 0; l < n_layers; ++l)
    layers.emplace_back(routers::WithLosses<routers::TopKRouter<double>, losses::ZLoss>(routers::TopKRouter<double>(cfg),
                                                                                       losses::ZLoss{.coeff = 0.1}),
                        experts::SwiGLU<double>(cfg));
  moe::Stack<Mixtral> stack(std::move(layers), {.pre_gating = true});
  stack.init(41);
  return stack;
}

// d(<r, y> + aux)/d(x, every parameter) against finite differences of the inference forward.
template <class Stack>
double check_stack_gradients(Stack& stack, RowMatrix<double>& x, const RowMatrix<double>& r) {
  moe::StackContext<double> ctx;
  RowMatrix<double> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  stack.zero_grad();
  stack.forward(x, y, ctx);
  stack.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(x.rows(), x.cols());
    const double aux = stack.forward(x, out);
    return (out.array() * r.array()).sum() + aux;
  };
  double biggest = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss).max_abs_numeric;
  stack.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    biggest = std::max(biggest, moe::test::check_gradient(name, p, loss, 24).max_abs_numeric);
  });
  return biggest;
}

}  // namespace

TEST_CASE("Stack: 3-layer MoE++ with gating residuals and the τ loss matches finite differences", "[stack][grad]") {
  auto stack = moepp_stack<double>(5, 3);
  moe::test::Rng rng(4);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 7, 5);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, 7, 5);
  // The residual maps are live: their gradients are checked with the rest (names layer<l>.router.gate_map).
  bool saw_map = false;
  stack.visit_parameters([&](const std::string& name, moe::Parameter<double>&) { saw_map |= name == "layer2.router.gate_map"; });
  REQUIRE(saw_map);
  CHECK(check_stack_gradients(stack, x, r) > 1e-3);
}

TEST_CASE("Stack: gating residuals change the routing of later layers only", "[stack]") {
  auto stack = moepp_stack<double>(5, 3);
  moe::test::Rng rng(6);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 40, 5);
  RowMatrix<double> y(40, 5);
  moe::StackContext<double> with, without;
  stack.forward(x, y, with);
  std::vector<std::vector<Index>> ids;
  for (std::size_t l = 0; l < 3; ++l) ids.emplace_back(with.result(l).expert_ids.begin(), with.result(l).expert_ids.end());
  for (std::size_t l = 0; l < 3; ++l) moe::detail::eigen(stack.layer(l).router().inner().gate_map()).setZero();
  const RowMatrix<double> y_with = y;
  // The recorded state: h_0 = x, h_3 = y, layer 0's logits W_g x (no previous layer).
  CHECK(moe::detail::eigen(with.hidden(0)) == x);
  CHECK(moe::detail::eigen(with.hidden(3)) == y);
  const RowMatrix<double> z0 = x * moe::detail::eigen(stack.layer(0).router().inner().inner().gate()).transpose();
  CHECK((moe::detail::eigen(with.logits(0)) - z0).norm() <= 1e-12 * z0.norm());
  REQUIRE(with.logits(1).rows() == 40);
  CHECK(with.logits(1).cols() == 6);
  stack.forward(x, y, without);
  CHECK(std::equal(ids[0].begin(), ids[0].end(), without.result(0).expert_ids.begin()));  // layer 0 has no residual
  bool changed = false;
  for (std::size_t l = 1; l < 3; ++l)
    changed |= !std::equal(ids[l].begin(), ids[l].end(), without.result(l).expert_ids.begin());
  CHECK(changed);
  CHECK((y - y_with).norm() > 0);
}

TEST_CASE("Stack with pre-gating: gradients, and the prefetch hook sees each layer's routing first", "[stack][grad][pregating]") {
  auto stack = pregated_stack(6, 3);
  moe::test::Rng rng(8);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 9, 6);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, 9, 6);
  CHECK(check_stack_gradients(stack, x, r) > 1e-3);

  std::vector<std::size_t> order;
  std::vector<std::vector<Index>> prefetched(3);
  stack.set_prefetch([&](std::size_t l, const moe::ForwardResult<double>& routing) {
    order.push_back(l);
    prefetched[l].assign(routing.expert_ids.begin(), routing.expert_ids.end());
  });
  moe::StackContext<double> ctx;
  RowMatrix<double> y(9, 6);
  stack.forward(x, y, ctx);
  CHECK(order == std::vector<std::size_t>{0, 1, 2});
  for (std::size_t l = 0; l < 3; ++l) {
    INFO("layer " << l);
    CHECK(std::equal(prefetched[l].begin(), prefetched[l].end(), ctx.result(l).expert_ids.begin(),
                     ctx.result(l).expert_ids.end()));
  }
}

TEST_CASE("Stack: forward, routing and every gradient are bitwise equal for 1-4 threads", "[stack][determinism]") {
  auto stack = moepp_stack<float>(32, 9);
  moe::test::Rng rng(10);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 257, 32), dy = moe::test::normal_matrix<float>(rng, 257, 32);
  std::vector<float> first;
  moe::test::for_each_thread_count([&](int threads) {
    moe::StackContext<float> ctx;
    RowMatrix<float> y(257, 32), dx(257, 32);
    stack.zero_grad();
    const double aux = stack.forward(x, y, ctx);
    stack.backward(dy, dx, ctx);
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    all.push_back(static_cast<float>(aux));
    for (std::size_t l = 0; l < 3; ++l)
      for (Index e : ctx.result(l).expert_ids) all.push_back(static_cast<float>(e));
    stack.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
      all.insert(all.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
    });
    INFO("threads " << threads);
    if (first.empty()) {
      first = all;
    } else {
      CHECK(all == first);
    }
  });
}

TEST_CASE("Stack rejects bad configurations and foreign contexts", "[stack][error]") {
  CHECK_THROWS_WITH(moe::Stack<Mixtral>(std::vector<Mixtral>{}), Catch::Contains("at least one layer"));
  CHECK_THROWS_WITH(
      ([] {
        std::vector<PlusLayer<double>> v;
        v.emplace_back(PlusRouter<double>(routers::GatingResidual(routers::TopKRouter<double>(
                                              {.d_model = 4, .d_ff = 4, .n_experts = 4, .top_k = 1})),
                                          losses::MoEPlusPlusLoss{}),
                       experts::SwiGLU<double>({.d_model = 4, .d_ff = 4, .n_experts = 1, .top_k = 1}),
                       experts::ConstantExperts<double>(1, 4), experts::CopyExperts<double>(1, 4),
                       experts::ZeroExperts<double>(1, 4));
        return moe::Stack<PlusLayer<double>>(std::move(v), {.pre_gating = true});
      })(),
      Catch::Contains("pre_gating cannot be combined"));
  auto b = pregated_stack(6, 2);
  moe::StackContext<double> ctx;
  RowMatrix<double> x = RowMatrix<double>::Ones(3, 6), y(3, 6), dx(3, 6);
  b.forward(x, y, ctx);
  auto c = pregated_stack(6, 2);
  CHECK_THROWS_WITH(c.backward(y, dx, ctx), Catch::Contains("not recorded by this stack"));
  RowMatrix<double> wrong(3, 5);
  CHECK_THROWS_WITH(b.forward(wrong, wrong), Catch::Contains("expected (n, 6)"));
}
