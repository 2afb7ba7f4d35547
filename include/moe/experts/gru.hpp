#pragma once
/// @file experts/gru.hpp
/// @brief GRU-cell experts (Hecto, arXiv 2506.22919): expert e updates a hidden state of width d_model,
///   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
///   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h,
/// and outputs h'. Weights follow torch.nn.GRUCell: weight_ih (3 d_model, d_model) and weight_hh
/// (3 d_model, d_model) with gate blocks in the order r, z, n, biases bias_ih and bias_hh (3 d_model).
///
/// The previous state of a grouped row is the output of an earlier row of the same expert, named by
/// `prev_rows` (-1: a fresh state, h = 0). That one interface serves both routing modes of docs/experts.md:
/// sequence-level routing (all tokens of a sequence on one expert: a chain over the whole sequence) and
/// token-level routing with carried state (the chain links the tokens of a sequence routed to this expert).
/// moe::carried_state_rows() (routing_plan.hpp) builds prev_rows from the plan and the sequence of each token. The plain
/// ExpertBank forward treats every row as a sequence of one step.

#include <algorithm>
#include <cmath>
#include <string_view>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "detail/dense.hpp"
#include "init.hpp"

namespace moe::experts {

/// A bank of n_experts GRU-cell experts with hidden width d_model (MoEConfig::d_ff is not used).
/// @tparam T    scalar type
/// @tparam Arch instruction set of the kernels
template <class T, class Arch = kernels::default_arch>
class GRU {
 public:
  using Scalar = T;

  /// @param cfg  shape (validated; moe::Error also when n_experts * 3 * d_model * d_model elements exceed
  ///             PTRDIFF_MAX bytes); weights start at 0, call init()
  /// @param init policy for weights and biases (default torch's U(-1/sqrt(d_model), 1/sqrt(d_model)); validated)
  explicit GRU(const MoEConfig& cfg, InitPolicy init = UniformFanIn{})
      : d_(checked(cfg).d_model),
        n_experts_(cfg.n_experts),
        init_(validated_init<T>(init, "moe::experts::GRU", "init")),
        w_ih_(n_experts_ * 3 * d_, d_),
        w_hh_(n_experts_ * 3 * d_, d_),
        b_ih_(n_experts_, 3 * d_),
        b_hh_(n_experts_, 3 * d_) {}

  Index d_model() const { return d_; }            ///< token width = hidden width
  Index n_experts() const { return n_experts_; }  ///< experts in the bank

  /// weight_ih of expert e, (3 d_model, d_model), gate blocks r, z, n.
  MatrixView<T> w_ih(Index e) { return w_ih_.value().middle_rows(e * 3 * d_, 3 * d_); }
  ConstMatrixView<T> w_ih(Index e) const { return w_ih_.value().middle_rows(e * 3 * d_, 3 * d_); }
  /// weight_hh of expert e, (3 d_model, d_model).
  MatrixView<T> w_hh(Index e) { return w_hh_.value().middle_rows(e * 3 * d_, 3 * d_); }
  ConstMatrixView<T> w_hh(Index e) const { return w_hh_.value().middle_rows(e * 3 * d_, 3 * d_); }
  /// bias_ih and bias_hh of expert e, (1, 3 d_model).
  MatrixView<T> b_ih(Index e) { return b_ih_.value().middle_rows(e, 1); }
  ConstMatrixView<T> b_ih(Index e) const { return b_ih_.value().middle_rows(e, 1); }
  MatrixView<T> b_hh(Index e) { return b_hh_.value().middle_rows(e, 1); }
  ConstMatrixView<T> b_hh(Index e) const { return b_hh_.value().middle_rows(e, 1); }

  /// Every tensor with the bank's policy, fan-in d_model (torch.nn.GRUCell's default).
  void init(Rng& rng) {
    for (Parameter<T>* p : {&w_ih_, &w_hh_, &b_ih_, &b_hh_}) initialize(rng, init_, *p, d_);
  }

  /// "weight_ih", "weight_hh" (n_experts * 3 d_model, d_model), "bias_ih", "bias_hh" (n_experts, 3 d_model).
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("weight_ih"), w_ih_);
    f(std::string_view("weight_hh"), w_hh_);
    f(std::string_view("bias_ih"), b_ih_);
    f(std::string_view("bias_hh"), b_hh_);
  }  /// No state besides the parameters.
  template <class F>
  void visit_state(F&&) {}

  /// ExpertBank forward: every row a sequence of one step from h = 0.
  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    forward(xs, offsets, nullptr, ys, arena);
  }

  /// Runs each expert over its rows in order, row r starting from the state ys(prev_rows[r]) (or 0).
  /// Experts run in parallel, the rows of one expert in order on one thread.
  /// @param prev_rows (rows) an earlier row of the same expert, or -1; nullptr: all -1. Checked before
  ///                  anything is written (throws moe::Error naming the row).
  void forward(ConstMatrixView<T> xs, const Index* offsets, const Index* prev_rows, MatrixView<T> ys,
               Arena& arena) const {
    const Index n_rows = xs.rows();
    T* gates = arena.take<T>(n_rows * 3 * d_);  // (rows, 3 d) W_ih x + b_ih, then r, z, n
    T* hgates = arena.take<T>(n_rows * 3 * d_);  // (rows, 3 d) W_hh h + b_hh
    if (arena.measuring() || n_rows == 0) return;
    check_prev_rows(offsets, prev_rows);
    MOE_OMP(omp parallel for schedule(dynamic)
                if(double(n_rows) * double(3 * d_) * double(d_) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const Steps s = steps(e, xs, r0, n, gates, hgates);
      for (Index r = r0; r < r0 + n; ++r) step(s, r, state(ys, prev_rows, r), ys.row(r));
    }
  }

  /// ExpertBank backward: every row a sequence of one step.
  void backward(ConstMatrixView<T> xs, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs,
                Arena& arena) {
    backward(xs, offsets, nullptr, dys, dxs, arena);
  }

  /// Backpropagation through time over the chains of prev_rows: dys (rows, d_model) is dL/d(output of each
  /// row) from outside; the gradient through the carried state is added here. Writes dxs, accumulates the
  /// weight gradients. The forward is recomputed from xs. Work items are experts; within one, rows run
  /// backwards in order, so every sum has a fixed order.
  void backward(ConstMatrixView<T> xs, const Index* offsets, const Index* prev_rows, ConstMatrixView<T> dys,
                MatrixView<T> dxs, Arena& arena) {
    const Index n_rows = xs.rows(), g3 = 3 * d_;
    T* gates = arena.take<T>(n_rows * g3);    // (rows, 3 d) r, z, n
    T* hgates = arena.take<T>(n_rows * g3);   // (rows, 3 d) W_hh h + b_hh
    T* states = arena.take<T>(n_rows * d_);   // (rows, d) h' of each row
    T* prevs = arena.take<T>(n_rows * d_);    // (rows, d) h of each row (its previous state)
    T* dstate = arena.take<T>(n_rows * d_);   // (rows, d) dL/dh'
    T* dgates = arena.take<T>(n_rows * g3);   // (rows, 3 d) dL/d(W_ih x + b_ih)
    T* dhgates = arena.take<T>(n_rows * g3);  // (rows, 3 d) dL/d(W_hh h + b_hh)
    if (arena.measuring() || n_rows == 0) return;
    check_prev_rows(offsets, prev_rows);
    const MatrixView<T> dw_ih = w_ih_.grad(), dw_hh = w_hh_.grad(), db_ih = b_ih_.grad(), db_hh = b_hh_.grad();
    const GRU& self = *this;

    MOE_OMP(omp parallel for schedule(dynamic)
                if(double(n_rows) * double(g3) * double(d_) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const Steps s = self.steps(e, xs, r0, n, gates, hgates);
      const MatrixView<T> h(states + r0 * d_, n, d_), hp(prevs + r0 * d_, n, d_), dh(dstate + r0 * d_, n, d_);
      const MatrixView<T> dg(dgates + r0 * g3, n, g3), dgh(dhgates + r0 * g3, n, g3);  // (n, 3 d) each
      const MatrixView<T> all_states(states, n_rows, d_);
      for (Index i = 0; i < n; ++i) {
        const T* prev = state(all_states, prev_rows, r0 + i);
        if (prev != nullptr) {
          std::copy_n(prev, d_, hp.row(i));
        } else {
          std::fill_n(hp.row(i), d_, T(0));
        }
        self.step(s, r0 + i, prev, h.row(i));
        std::copy_n(dys.row(r0 + i), d_, dh.row(i));
      }
      const ConstMatrixView<T> whh = self.w_hh(e);
      for (Index i = n - 1; i >= 0; --i) {
        const T* gate = s.gates.row(r0 + i);   // r, z, n
        const T* hgate = s.hgates.row(r0 + i);  // W_hh h + b_hh
        T* d_in = dg.row(i);
        T* d_h = dgh.row(i);
        for (Index j = 0; j < d_; ++j) {
          const T rg = gate[j], zg = gate[d_ + j], ng = gate[2 * d_ + j], g = dh(i, j);
          const T dn = g * (T(1) - zg) * (T(1) - ng * ng);
          const T dr = dn * hgate[2 * d_ + j] * rg * (T(1) - rg);
          const T dz = g * (hp(i, j) - ng) * zg * (T(1) - zg);
          d_in[j] = dr;
          d_in[d_ + j] = dz;
          d_in[2 * d_ + j] = dn;
          d_h[j] = dr;
          d_h[d_ + j] = dz;
          d_h[2 * d_ + j] = dn * rg;
        }
        const Index p = prev_rows == nullptr ? -1 : prev_rows[r0 + i];
        if (p < 0) continue;
        // dL/dh of the previous row: through z directly, and through the three W_hh h terms.
        const MatrixView<T> dprev = dh.middle_rows(p - r0, 1);  // (1, d)
        for (Index j = 0; j < d_; ++j) dprev(0, j) += dh(i, j) * gate[d_ + j];
        kernels::parallel_add_matmul_nn<T>(Arch{}, ConstMatrixView<T>(d_h, 1, g3), whh, dprev);
      }
      const auto dx = dxs.middle_rows(r0, n);  // (n, d)
      detail::set_zero(dx);
      detail::linear_backward<Arch, T>(dg, xs.middle_rows(r0, n), self.w_ih(e), dw_ih.middle_rows(e * g3, g3),
                                 db_ih.row(e), dx);
      detail::linear_backward<Arch, T>(dgh, hp, whh, dw_hh.middle_rows(e * g3, g3), db_hh.row(e), {});
    }
  }

 private:
  // One expert's weights and the scratch its steps write (views over all grouped rows).
  struct Steps {
    ConstMatrixView<T> w_hh;  // (3 d, d)
    const T* b_hh;            // (3 d)
    MatrixView<T> gates;      // (rows, 3 d)
    MatrixView<T> hgates;     // (rows, 3 d)
  };

  // The input projections of all of expert e's rows at once (they do not depend on the state).
  Steps steps(Index e, ConstMatrixView<T> xs, Index r0, Index n, T* gates, T* hgates) const {
    const Steps s{w_hh(e), b_hh(e).data(), MatrixView<T>(gates, xs.rows(), 3 * d_),
                  MatrixView<T>(hgates, xs.rows(), 3 * d_)};
    detail::linear<Arch, T>(xs.middle_rows(r0, n), w_ih(e), b_ih(e).data(), s.gates.middle_rows(r0, n));
    return s;
  }

  // One time step of row r from state h (nullptr: zero) into out (d); leaves r, z, n in gates(r).
  void step(const Steps& s, Index r, const T* h, T* out) const {
    T* gate = s.gates.row(r);
    T* hgate = s.hgates.row(r);
    if (h != nullptr) {
      detail::linear<Arch, T>(ConstMatrixView<T>(h, 1, d_), s.w_hh, s.b_hh, MatrixView<T>(hgate, 1, 3 * d_));
    } else {
      std::copy_n(s.b_hh, 3 * d_, hgate);
    }
    for (Index j = 0; j < d_; ++j) {
      const T rg = sigmoid(gate[j] + hgate[j]);
      const T zg = sigmoid(gate[d_ + j] + hgate[d_ + j]);
      const T ng = std::tanh(gate[2 * d_ + j] + rg * hgate[2 * d_ + j]);
      gate[j] = rg;
      gate[d_ + j] = zg;
      gate[2 * d_ + j] = ng;
      out[j] = (T(1) - zg) * ng + (h != nullptr ? zg * h[j] : T(0));
    }
  }

  static T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

  // The state row r starts from: row prev_rows[r] of m, or nullptr for a fresh (zero) state.
  static const T* state(MatrixView<T> m, const Index* prev_rows, Index r) {
    return prev_rows == nullptr || prev_rows[r] < 0 ? nullptr : m.row(prev_rows[r]);
  }

  void check_prev_rows(const Index* offsets, const Index* prev_rows) const {
    if (prev_rows == nullptr) return;
    for (Index e = 0; e < n_experts_; ++e)
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
        moe::detail::require(prev_rows[r] == -1 || (prev_rows[r] >= offsets[e] && prev_rows[r] < r),
                             "moe::experts::GRU: prev_rows[", r, "] = ", prev_rows[r],
                             " is neither -1 nor an earlier row of expert ", e, " (rows [", offsets[e], ", ",
                             offsets[e + 1], "))");
  }

  // cfg validated, and the weights it sizes, (n_experts * 3 d_model, d_model) twice, checked before allocation.
  static const MoEConfig& checked(const MoEConfig& cfg) {
    cfg.validate();
    moe::detail::checked_size<T>("moe::experts::GRU", "n_experts * 3 * d_model * d_model",
                                 {cfg.n_experts, 3, cfg.d_model, cfg.d_model});
    return cfg;
  }

  Index d_;
  Index n_experts_;
  InitPolicy init_;
  Parameter<T> w_ih_;  // (n_experts * 3 d, d)
  Parameter<T> w_hh_;  // (n_experts * 3 d, d)
  Parameter<T> b_ih_;  // (n_experts, 3 d)
  Parameter<T> b_hh_;  // (n_experts, 3 d)
};

}  // namespace moe::experts
