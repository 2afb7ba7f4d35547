#pragma once
/// @file experts/zero_computation.hpp
/// @brief The zero-computation experts of MoE++ (arXiv 2410.07348, Eq. 3-5): zero (discard, also AdaMoE's
/// null expert as a bank), copy (skip) and constant (replace) experts. They cost O(d_model) per routed
/// row and never a matrix product; `zero_computation = true` lets statistics and losses tell them from
/// FFN experts (MoE++'s heterogeneous loss weighs them by tau).
///
/// Put them in a layer after the FFN bank, as MoE++ orders its experts:
///   MoELayer<Router, experts::SwiGLU<T>, experts::ConstantExperts<T>, experts::CopyExperts<T>,
///            experts::ZeroExperts<T>>
/// A token whose slots all land on them skips the FFNs entirely.

#include <algorithm>
#include <cmath>
#include <string_view>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"

namespace moe::detail {

/// Shape shared by the zero-computation banks, validated with an error naming the field.
class ZeroComputationShape {
 public:
  ZeroComputationShape(const char* kind, Index n_experts, Index d_model) : n_experts_(n_experts), d_model_(d_model) {
    require(n_experts >= 1, "moe::experts::", kind, ": n_experts = ", n_experts, " must be >= 1");
    require(d_model >= 1, "moe::experts::", kind, ": d_model = ", d_model, " must be >= 1");
  }
  Index n_experts() const { return n_experts_; }  ///< experts in the bank
  Index d_model() const { return d_model_; }      ///< token width
  static constexpr bool zero_computation = true;

 protected:
  /// Calls f(rows of expert e as [first, last)) for each expert of the bank.
  template <class F>
  void for_each_expert(const Index* offsets, F&& f) const {
    for (Index e = 0; e < n_experts_; ++e) f(e, offsets[e], offsets[e + 1]);
  }

 private:
  Index n_experts_;
  Index d_model_;
};

}  // namespace moe::detail

namespace moe::experts {

/// E(x) = 0: the slot contributes nothing (MoE++ "discard").
template <class T>
class ZeroExperts : public detail::ZeroComputationShape {
 public:
  using Scalar = T;
  /// @param n_experts zero experts in the bank; @param d_model token width
  ZeroExperts(Index n_experts, Index d_model) : ZeroComputationShape("ZeroExperts", n_experts, d_model) {}

  void init(Rng&) {}  ///< no parameters
  template <class F>
  void visit_parameters(F&&) {}  ///< no parameters
  template <class F>
  void visit_state(F&&) {}  ///< no state

  void forward(ConstMatrixView<T>, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    if (arena.measuring()) return;
    fill_rows(offsets, ys);
  }
  void backward(ConstMatrixView<T>, const Index* offsets, ConstMatrixView<T>, MatrixView<T> dxs, Arena& arena) {
    if (arena.measuring()) return;
    fill_rows(offsets, dxs);
  }

 private:
  void fill_rows(const Index* offsets, MatrixView<T> m) const {
    for (Index r = offsets[0]; r < offsets[n_experts()]; ++r) std::fill_n(m.row(r), m.cols(), T(0));
  }
};

/// E(x) = x: the token passes through unchanged (MoE++ "skip"; LongCat-Flash's identity experts).
template <class T>
class CopyExperts : public detail::ZeroComputationShape {
 public:
  using Scalar = T;
  /// @param n_experts copy experts in the bank; @param d_model token width
  CopyExperts(Index n_experts, Index d_model) : ZeroComputationShape("CopyExperts", n_experts, d_model) {}

  void init(Rng&) {}  ///< no parameters
  template <class F>
  void visit_parameters(F&&) {}  ///< no parameters
  template <class F>
  void visit_state(F&&) {}  ///< no state

  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    if (arena.measuring()) return;
    copy_rows(offsets, xs, ys);
  }
  void backward(ConstMatrixView<T>, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs, Arena& arena) {
    if (arena.measuring()) return;
    copy_rows(offsets, dys, dxs);
  }

 private:
  void copy_rows(const Index* offsets, ConstMatrixView<T> from, MatrixView<T> to) const {
    for (Index r = offsets[0]; r < offsets[n_experts()]; ++r) std::copy_n(from.row(r), from.cols(), to.row(r));
  }
};

/// E(x) = a1 x + a2 v with [a1, a2] = softmax(W_c x): the token is pulled toward a trained vector v
/// (MoE++ "replace"). Per expert: W_c (2, d_model) and v (d_model). Initialised as the official code
/// does: W_c like nn.Linear(d_model, 2), v from N(0, 1).
template <class T>
class ConstantExperts : public detail::ZeroComputationShape {
 public:
  using Scalar = T;
  /// @param n_experts constant experts in the bank; @param d_model token width
  /// Throws moe::Error when 2 * n_experts * d_model elements exceed PTRDIFF_MAX bytes.
  ConstantExperts(Index n_experts, Index d_model)
      : ZeroComputationShape("ConstantExperts", n_experts, d_model),
        wc_(wc_rows(n_experts, d_model), d_model),
        v_(n_experts, d_model) {}

  /// The mixing projection W_c of expert e, (2, d_model).
  MatrixView<T> wc(Index e) { return wc_.value().middle_rows(2 * e, 2); }
  ConstMatrixView<T> wc(Index e) const { return wc_.value().middle_rows(2 * e, 2); }
  /// The constant vector v of expert e, (1, d_model).
  MatrixView<T> v(Index e) { return v_.value().middle_rows(e, 1); }
  ConstMatrixView<T> v(Index e) const { return v_.value().middle_rows(e, 1); }

  void init(Rng& rng) {
    wc_.init_uniform(rng, d_model());
    for (Index i = 0; i < n_experts() * d_model(); ++i) v_.data()[i] = static_cast<T>(rng.normal());
  }
  /// Calls f(name, Parameter&) for "wc" (2 n_experts, d_model) and "v" (n_experts, d_model).
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("wc"), wc_);
    f(std::string_view("v"), v_);
  }
  template <class F>
  void visit_state(F&&) {}  ///< no state besides the parameters

  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    if (arena.measuring()) return;
    for_each_expert(offsets, [&](Index e, Index first, Index last) {
      MOE_OMP(omp parallel for schedule(static) if(double(last - first) * double(d_model()) >= moe::detail::k_parallel_min_work))
      for (Index r = first; r < last; ++r) {
        const Mix m = mix(e, xs.row(r));
        const T* v = this->v(e).data();
        for (Index j = 0; j < d_model(); ++j) ys(r, j) = m.a1 * xs(r, j) + m.a2 * v[j];
      }
    });
  }

  /// With s = W_c x and a = softmax(s): dL/da = (<dy, x>, <dy, v>), ds = a (dL/da - <dL/da, a>),
  /// dW_c += ds x^T, dv += a2 dy, dx = a1 dy + W_c^T ds. Rows of one expert are summed in row order.
  void backward(ConstMatrixView<T> xs, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs, Arena& arena) {
    if (arena.measuring()) return;
    const MatrixView<T> dwc = wc_.grad(), dv = v_.grad();
    const ConstantExperts& self = *this;
    MOE_OMP(omp parallel for schedule(static) if(double(offsets[n_experts()] - offsets[0]) * double(d_model()) >=
                                                   moe::detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts(); ++e) {
      const T* wc = self.wc(e).data();  // (2, d_model)
      const T* v = self.v(e).data();    // (d_model)
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
        const T* x = xs.row(r);
        const T* dy = dys.row(r);
        const Mix m = self.mix(e, x);
        T da1 = 0, da2 = 0;
        for (Index j = 0; j < d_model(); ++j) {
          da1 += dy[j] * x[j];
          da2 += dy[j] * v[j];
        }
        const T dot = da1 * m.a1 + da2 * m.a2;
        const T ds1 = m.a1 * (da1 - dot), ds2 = m.a2 * (da2 - dot);
        T* gwc = dwc.row(2 * e);
        T* gv = dv.row(e);
        T* dx = dxs.row(r);
        for (Index j = 0; j < d_model(); ++j) {
          gwc[j] += ds1 * x[j];
          gwc[d_model() + j] += ds2 * x[j];
          gv[j] += m.a2 * dy[j];
          dx[j] = m.a1 * dy[j] + wc[j] * ds1 + wc[d_model() + j] * ds2;
        }
      }
    }
  }

 private:
  struct Mix {
    T a1, a2;
  };
  // 2 n_experts, once W_c's 2 * n_experts * d_model elements are known to fit.
  static Index wc_rows(Index n_experts, Index d_model) {
    moe::detail::checked_size<T>("moe::experts::ConstantExperts", "2 * n_experts * d_model", {2, n_experts, d_model});
    return 2 * n_experts;
  }
  // [a1, a2] = softmax(W_c x) as two logistic functions: stable, and each accurate when it is tiny.
  Mix mix(Index e, const T* x) const {
    const T* wc = wc_.data() + 2 * e * d_model();
    T s1 = 0, s2 = 0;
    for (Index j = 0; j < d_model(); ++j) {
      s1 += wc[j] * x[j];
      s2 += wc[d_model() + j] * x[j];
    }
    return {T(1) / (T(1) + std::exp(s2 - s1)), T(1) / (T(1) + std::exp(s1 - s2))};
  }

  Parameter<T> wc_;  // (2 n_experts, d_model): rows 2e, 2e+1 are expert e's W_c
  Parameter<T> v_;   // (n_experts, d_model)
};

}  // namespace moe::experts
