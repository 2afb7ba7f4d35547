#pragma once
// Bank-level test harness shared by every expert test: offsets from per-expert counts, a forward with a
// measured workspace, naive double building blocks (nn.Linear, activations), a finite-difference check of
// every parameter and the input, and the zero-token-expert check (RELIABILITY.md G2, G5).

#include <bit>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/config.hpp>
#include <moe/parameter.hpp>
#include <moe/reference/naive_moe.hpp>
#include <moe/workspace.hpp>

#include "support/gradcheck.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"

namespace moe::test {

using Vec = std::vector<double>;

/// Grouped-row offsets {0, c0, c0 + c1, ...} from per-expert row counts.
inline std::vector<Index> offsets_from(const std::vector<Index>& counts) {
  std::vector<Index> offsets{0};
  for (Index c : counts) offsets.push_back(offsets.back() + c);
  return offsets;
}

/// Runs run(arena) once with a measuring arena, then with a workspace of exactly the measured size.
template <class Run>
void with_measured_arena(Run&& run) {
  Arena measure;
  run(measure);
  Workspace ws(measure.peak());
  Arena arena(ws);
  run(arena);
}

/// ys = bank.forward(xs, offsets) with a workspace of exactly the measured size.
template <class Bank, class T = typename Bank::Scalar>
RowMatrix<T> bank_forward(const Bank& bank, const RowMatrix<T>& xs, const std::vector<Index>& offsets) {
  RowMatrix<T> ys = RowMatrix<T>::Constant(xs.rows(), bank.d_model(), T(-99));
  with_measured_arena([&](Arena& arena) {
    if (arena.measuring())
      bank.forward(ConstMatrixView<T>::shape_only(xs.rows(), bank.d_model()), nullptr,
                   MatrixView<T>::shape_only(xs.rows(), bank.d_model()), arena);
    else
      bank.forward(xs, offsets.data(), ys, arena);
  });
  return ys;
}

/// w x (+ b) in double: nn.Linear with w (out, in).
template <class T>
Vec naive_linear(ConstMatrixView<T> w, const Vec& x, const T* bias = nullptr) {
  Vec y(static_cast<std::size_t>(w.rows()));
  for (Index i = 0; i < w.rows(); ++i) {
    double a = bias != nullptr ? double(bias[i]) : 0.0;
    for (Index j = 0; j < w.cols(); ++j) a += double(w(i, j)) * x[static_cast<std::size_t>(j)];
    y[static_cast<std::size_t>(i)] = a;
  }
  return y;
}

/// Row i of m as doubles.
template <class T>
Vec row_of(ConstMatrixView<T> m, Index i) {
  return Vec(m.row(i), m.row(i) + m.cols());
}

/// The weights of one FFN expert, any scalar; w3 and the biases may be empty / null.
template <class T>
struct NaiveFFNWeights {
  ConstMatrixView<T> w1, w3, w2;
  const T *b1 = nullptr, *b3 = nullptr, *b2 = nullptr;
};

/// One FFN expert on one row in double: w2 (act(w1 x + b1) [* (w3 x + b3)]) + b2.
template <class T>
Vec naive_ffn(const std::string& act_name, bool gated, const NaiveFFNWeights<T>& w, const Vec& x) {
  const auto act = reference::naive_activation(act_name);
  Vec h = naive_linear(w.w1, x, w.b1);
  const Vec u = gated ? naive_linear(w.w3, x, w.b3) : Vec();
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = gated ? act(h[i]) * u[i] : act(h[i]);
  return naive_linear(w.w2, h, w.b2);
}

/// An FFN bank (experts::FFN: w1/w3/w2 and optional biases) on grouped rows, one naive_ffn per row.
template <class Bank>
RowMatrix<double> naive_ffn_bank(Bank& bank, const RowMatrix<typename Bank::Scalar>& xs, const std::vector<Index>& offsets) {
  using T = typename Bank::Scalar;
  RowMatrix<double> ys(xs.rows(), bank.d_model());
  for (Index e = 0; e < bank.n_experts(); ++e) {
    NaiveFFNWeights<T> w{bank.w1(e), {}, bank.w2(e)};
    if constexpr (Bank::gated) w.w3 = bank.w3(e);
    if (bank.has_bias()) {
      w.b1 = bank.b1(e).data();
      w.b2 = bank.b2(e).data();
      if constexpr (Bank::gated) w.b3 = bank.b3(e).data();
    }
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      const auto y = naive_ffn(Bank::Activation::name(), Bank::gated, w, row_of<T>(xs, r));
      for (Index o = 0; o < bank.d_model(); ++o) ys(r, o) = y[static_cast<std::size_t>(o)];
    }
  }
  return ys;
}

/// Finite-difference check (double) of L = sum(ys .* R) w.r.t. the input xs and every parameter `bank`
/// visits. `forward(ys, arena)` computes ys from the current xs and parameters; `backward(R, dxs, arena)`
/// writes dxs and accumulates the parameter gradients. Returns the largest |numeric gradient| seen, for a
/// vacuity guard.
template <class Bank, class Forward, class Backward>
double check_bank_gradients(Bank& bank, RowMatrix<double>& xs, Index out_cols, Forward&& forward,
                            Backward&& backward, std::uint64_t seed = 5) {
  Rng rng(seed);
  const RowMatrix<double> r = normal_matrix<double>(rng, xs.rows(), out_cols);
  Workspace ws(1 << 22);
  const auto loss = [&] {
    RowMatrix<double> ys(xs.rows(), out_cols);
    Arena arena(ws);
    forward(MatrixView<double>(ys), arena);
    return (ys.array() * r.array()).sum();
  };
  bank.visit_parameters([](std::string_view, Parameter<double>& p) { p.zero_grad(); });
  RowMatrix<double> dxs(xs.rows(), xs.cols());
  {
    Arena arena(ws);
    backward(ConstMatrixView<double>(r), MatrixView<double>(dxs), arena);
  }
  double biggest = check_gradient("dxs", xs.data(), dxs.data(), xs.size(), loss).max_abs_numeric;
  bank.visit_parameters([&](std::string_view name, Parameter<double>& p) {
    INFO("parameter " << name);
    biggest = std::max(biggest, check_gradient(std::string(name), p, loss, 64).max_abs_numeric);
  });
  return biggest;
}

/// G5: after backward(arena) over a NaN-poisoned workspace, every parameter rows that belong to expert
/// `empty` (each visited parameter stacks n_experts equal blocks of rows) hold exactly +0.0, and
/// some other gradient element is finite and non-zero.
template <class Bank, class Backward>
void check_empty_expert_gradient(Bank& bank, Index n_experts, Index empty, Backward&& backward) {
  Workspace ws(1 << 22);
  std::fill_n(reinterpret_cast<float*>(ws.data()), ws.capacity() / sizeof(float),
              std::numeric_limits<float>::quiet_NaN());
  {
    Arena arena(ws);
    backward(arena);
  }
  bool some_nonzero = false;
  bank.visit_parameters([&](std::string_view name, Parameter<float>& p) {
    const auto g = p.grad();
    const Index per_expert = g.rows() / n_experts;
    INFO(name);
    for (Index i = 0; i < g.rows(); ++i) {
      for (Index j = 0; j < g.cols(); ++j) {
        if (i / per_expert == empty) {
          REQUIRE(std::bit_cast<std::uint32_t>(g(i, j)) == 0u);
        } else {
          REQUIRE(std::isfinite(g(i, j)));
          some_nonzero = some_nonzero || g(i, j) != 0.0f;
        }
      }
    }
  });
  REQUIRE(some_nonzero);
}

/// Initialises `bank` from `seed`, runs it on random rows grouped by `counts` and compares with
/// naive(bank, xs, offsets) (a double reference): NMSE <= bound, and the reference is not all zero.
template <class Bank, class Naive>
void check_bank_forward(Bank& bank, const std::vector<Index>& counts, Naive&& naive, double bound,
                        std::uint64_t seed = 11) {
  using T = typename Bank::Scalar;
  Rng rng(seed);
  bank.init(rng);
  const auto offsets = offsets_from(counts);
  const RowMatrix<T> xs = normal_matrix<T>(rng, offsets.back(), bank.d_model());
  const RowMatrix<T> ys = bank_forward(bank, xs, offsets);
  const RowMatrix<double> ref = naive(bank, xs, offsets);
  REQUIRE(ref.norm() > 0);
  INFO("NMSE " << nmse(ref.data(), ys.data(), static_cast<std::size_t>(ref.size())));
  CHECK(nmse(ref.data(), ys.data(), static_cast<std::size_t>(ref.size())) <= bound);
}

/// G5 for a routed bank of 3 experts and d_model 16: expert 1 gets no row of 9.
template <class Bank>
void check_empty_expert_gradient(Bank& bank) {
  Rng rng(3);
  bank.init(rng);
  const std::vector<Index> offsets = {0, 5, 5, 9};
  const RowMatrix<float> xs = normal_matrix<float>(rng, 9, 16);
  const RowMatrix<float> dys = normal_matrix<float>(rng, 9, 16);
  RowMatrix<float> dxs(9, 16);
  check_empty_expert_gradient(bank, 3, 1, [&](Arena& arena) { bank.backward(xs, offsets.data(), dys, dxs, arena); });
  REQUIRE(dxs.allFinite());
}

}  // namespace moe::test
