// RELIABILITY.md D3 at the layer level: the same MoE layer built on moe::kernels::default_arch and on
// moe::kernels::scalar (router and bank Arch parameters; the combine always runs scatter_add on
// default_arch, which gives the scalar bits by design) agree within a derived forward-error bound, choose
// the same experts, and both lie within that bound of an independent double reference. Forward and
// backward; routers: top-k softmax renormalised (Mixtral) and raw (Qwen2); banks: SwiGLU f32, plain SiLU
// FFN with biases f32, SwiGLU with bf16 and with int8 weight storage.
//
// The bound (why it is not a magic number). The reference runs the layer's formulas in double on values
// that carry an error bound e, so that |what any correct f32 implementation computes - v| <= e, whatever
// its summation order, vector width or use of FMA:
//  - a sum or dot product of n terms (kernels sum in any order, fused or not) adds gamma_n * sum |terms|
//    (N1), plus n * 2^-126 for the flush-to-zero of AVX512-BF16;
//  - a product, quotient or difference of carried values adds the first-order propagation of their errors
//    plus one rounding u = 2^-24 of the result's magnitude;
//  - SiLU (vector kernel and scalar formula) is within 10 eps32 = 20u relative of SiLU of its computed
//    input (N3, kernels/activation_test), and |SiLU'| <= 1.0999 moves it by at most 1.1 e;
//  - SiLU's derivative (scalar: s (1 + x (1 - s)), s = 1 / (1 + exp(-x))) is within 10u (1 + |x|) of
//    its exact value (a handful of roundings of terms no larger than 1 + |x|), and |SiLU''| <= 0.5;
//  - softmax_row is within 10 eps32 relative (absolute for p <= 1e-5) of the softmax of its computed
//    logits (N3, kernels/softmax_test), and logits moved by at most D move p_i by at most 2 p_i e^(2D) D;
//  - bf16 storage: products of bf16 values are exact in f32; the hidden activation is rounded to bf16
//    (2^-8 relative) before the second GEMM. int8 storage: integer sums are exact; a hidden row h is
//    quantised with step s = max|h| / 127, an error of at most s (1/2 + 256u) per element. The token
//    input's rounding is the same on both paths and is applied exactly to the reference.
// Each path is then checked within e of the reference, and SIMD against scalar within 2 e (the N1 form
// 2 gamma_{K+2} sum |terms| for a single GEMM). Selections must match wherever the reference's k-th and
// (k+1)-th probabilities are further apart than their error bounds (asserted: no near-ties in this data).
// Being a worst case, the bound sits far above what runs show (the test prints the largest error / bound
// per tensor: about 1e-2 on AVX-512); a negative control checks that it still sees a 1 % error in one
// output channel (f32).

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

namespace {

constexpr double u = 0x1.0p-24;             // f32 unit roundoff
constexpr double eps32 = 0x1.0p-23;
constexpr double u_bf16 = 0x1.0p-8;         // bf16 unit roundoff (8 significant bits)
constexpr double min_normal32 = 0x1.0p-126;

double gamma_f32(double n) { return moe::test::gamma_n<float>(n); }

// A value of the reference and the bound on how far a correct f32 computation of it can be.
struct Val {
  double v = 0;
  double e = 0;
  double mag() const { return std::abs(v) + e; }
};

// n terms summed in any order (with or without FMA).
class Sum {
 public:
  void add(Val a) {
    v_ += a.v;
    e_ += a.e;
    m_ += a.mag();
    ++n_;
  }
  void add_product(Val a, Val b) {
    v_ += a.v * b.v;
    e_ += std::abs(a.v) * b.e + std::abs(b.v) * a.e + a.e * b.e;
    m_ += a.mag() * b.mag();
    ++n_;
  }
  Val result() const { return {v_, e_ + gamma_f32(static_cast<double>(n_)) * m_ + static_cast<double>(n_) * min_normal32}; }

 private:
  double v_ = 0, e_ = 0, m_ = 0;
  Index n_ = 0;
};

Val rounded(double v, double e) { return {v, e + u * (std::abs(v) + e)}; }
Val mul(Val a, Val b) { return rounded(a.v * b.v, std::abs(a.v) * b.e + std::abs(b.v) * a.e + a.e * b.e); }
Val sub(Val a, Val b) { return rounded(a.v - b.v, a.e + b.e); }
Val div(Val a, Val b) {
  REQUIRE(std::abs(b.v) > b.e);
  const double q = a.v / b.v;
  return rounded(q, (a.e + std::abs(q) * b.e) / (std::abs(b.v) - b.e));
}

double silu(double x) { return x / (1 + std::exp(-x)); }
double silu_derivative(double x) {
  const double s = 1 / (1 + std::exp(-x));
  return s * (1 + x * (1 - s));
}
Val silu(Val a) {
  const double moved = 1.1 * a.e, f = silu(a.v);
  return {f, moved + 10 * eps32 * (std::abs(f) + moved) + 1e-30};
}
Val silu_derivative(Val a) {
  const double moved = 0.5 * a.e;
  return {silu_derivative(a.v), moved + 10 * u * (1 + a.mag())};
}

// softmax over a row of bounded logits.
std::vector<Val> softmax(const std::vector<Val>& z) {
  double D = 0, mx = -std::numeric_limits<double>::infinity(), sum = 0;
  for (const Val& v : z) {
    D = std::max(D, v.e);
    mx = std::max(mx, v.v);
  }
  std::vector<Val> p(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) sum += (p[i].v = std::exp(z[i].v - mx));
  for (auto& v : p) {
    v.v /= sum;
    const double moved = 2 * v.v * std::exp(2 * D) * D, up = v.v + moved;
    v.e = moved + 10 * eps32 * (up > 1e-5 ? up : 1.0);
  }
  return p;
}

enum class Storage { native, bf16, int8 };

// The weights the reference multiplies by: canonical (backward, native forward) and as the forward kernels
// see them (bf16: rounded; int8: per output channel s_w * q with the kernel's own encode()).
struct RefWeights {
  Index E = 0, d = 0, ff = 0;
  bool gated = true, renormalize = true, bias = false;
  Storage storage = Storage::native;
  RowMatrix<double> gate;                                   // (E, d)
  std::vector<RowMatrix<double>> w1, w3, w2, w1f, w3f, w2f;  // per expert: (ff, d), (ff, d), (d, ff)
  std::vector<std::vector<double>> b1, b3, b2;              // per expert, empty without biases
};

RowMatrix<double> stored(moe::ConstMatrixView<float> w, Storage s) {
  RowMatrix<double> out(w.rows(), w.cols());
  for (Index i = 0; i < w.rows(); ++i) {
    const float scale = kernels::Int8Panels<float, kernels::scalar>::column_scale(w.row(i), w.cols());
    for (Index j = 0; j < w.cols(); ++j) {
      const float v = w(i, j);
      switch (s) {
        case Storage::native: out(i, j) = v; break;
        case Storage::bf16: out(i, j) = kernels::detail::from_bf16(kernels::detail::to_bf16(v)); break;
        case Storage::int8:
          out(i, j) = double(scale) * double(kernels::Int8Panels<float, kernels::scalar>::encode(v, scale));
          break;
      }
    }
  }
  return out;
}

RowMatrix<double> to_double(moe::ConstMatrixView<float> w) { return stored(w, Storage::native); }

template <class Layer>
RefWeights ref_weights(const Layer& layer, Storage storage, bool bias) {
  const auto& bank = layer.template bank<0>();
  using Bank = std::remove_cvref_t<decltype(bank)>;
  RefWeights r;
  r.E = layer.n_experts();
  r.d = layer.d_model();
  r.ff = bank.d_ff();
  r.gated = Bank::gated;
  r.renormalize = layer.router().renormalize();
  r.bias = bias;
  r.storage = storage;
  r.gate = to_double(layer.router().gate());
  for (Index e = 0; e < r.E; ++e) {
    r.w1.push_back(to_double(bank.w1(e)));
    r.w2.push_back(to_double(bank.w2(e)));
    r.w1f.push_back(stored(bank.w1(e), storage));
    r.w2f.push_back(stored(bank.w2(e), storage));
    if constexpr (Bank::gated) {
      r.w3.push_back(to_double(bank.w3(e)));
      r.w3f.push_back(stored(bank.w3(e), storage));
    }
    if (bias) {
      // The bias accessors are non-const (they count as writes): read through a copy of the bank.
      Bank copy = bank;
      const auto row = [](moe::MatrixView<float> b) { return std::vector<double>(b.data(), b.data() + b.cols()); };
      r.b1.push_back(row(copy.b1(e)));
      r.b2.push_back(row(copy.b2(e)));
      if constexpr (Bank::gated) r.b3.push_back(row(copy.b3(e)));
    }
  }
  return r;
}

// The token row as the first GEMM reads it: exact for f32, rounded to bf16, or int8 s_x * q (per row).
std::vector<double> stored_input(const float* x, Index n, Storage s) {
  std::vector<double> out(static_cast<std::size_t>(n));
  float m = 0;
  for (Index j = 0; j < n; ++j) m = std::max(m, std::abs(x[j]));
  const float scale = m / 127.0f;
  for (Index j = 0; j < n; ++j) {
    switch (s) {
      case Storage::native: out[static_cast<std::size_t>(j)] = x[j]; break;
      case Storage::bf16: out[static_cast<std::size_t>(j)] = kernels::detail::from_bf16(kernels::detail::to_bf16(x[j])); break;
      case Storage::int8:
        out[static_cast<std::size_t>(j)] = double(scale) * double(kernels::Int8Panels<float, kernels::scalar>::encode(x[j], scale));
        break;
    }
  }
  return out;
}

// The hidden row rounded for the second GEMM: the reference keeps the exact value and widens the bound.
void round_hidden(std::vector<Val>& h, Storage s) {
  if (s == Storage::bf16)
    for (Val& v : h) v.e += u_bf16 * v.mag();
  if (s == Storage::int8) {
    double m = 0;
    for (const Val& v : h) m = std::max(m, v.mag());
    const double step = m / 127 * (1 + 2 * u);
    for (Val& v : h) v.e += step * (0.5 + 256 * u);
  }
}

// Everything the reference computes, with the same layout as the layer's outputs and gradients.
struct Reference {
  std::vector<std::vector<Index>> ids;  // per token, the chosen experts in descending probability
  std::vector<std::vector<Val>> w;      // per token, their weights
  std::vector<Val> y, dx;               // (n_tokens, d)
  std::vector<std::pair<std::string, std::vector<Val>>> grads;  // in visit_parameters order
  Index near_ties = 0;
};

// hidden pre-activations of expert e for one input row: W x (+ b).
std::vector<Val> linear(const RowMatrix<double>& w, const std::vector<double>& x, const std::vector<double>* bias) {
  std::vector<Val> out(static_cast<std::size_t>(w.rows()));
  for (Index i = 0; i < w.rows(); ++i) {
    Sum s;
    for (Index j = 0; j < w.cols(); ++j) s.add_product({w(i, j), 0}, {x[static_cast<std::size_t>(j)], 0});
    if (bias != nullptr) s.add({(*bias)[static_cast<std::size_t>(i)], 0});
    out[static_cast<std::size_t>(i)] = s.result();
  }
  return out;
}
std::vector<Val> linear(const RowMatrix<double>& w, const std::vector<Val>& x, const std::vector<double>* bias) {
  std::vector<Val> out(static_cast<std::size_t>(w.rows()));
  for (Index i = 0; i < w.rows(); ++i) {
    Sum s;
    for (Index j = 0; j < w.cols(); ++j) s.add_product({w(i, j), 0}, x[static_cast<std::size_t>(j)]);
    if (bias != nullptr) s.add({(*bias)[static_cast<std::size_t>(i)], 0});
    out[static_cast<std::size_t>(i)] = s.result();
  }
  return out;
}
std::vector<Val> activate(const std::vector<Val>& a, const std::vector<Val>& b, bool gated) {
  std::vector<Val> h(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) h[i] = gated ? mul(silu(a[i]), b[i]) : silu(a[i]);
  return h;
}

Reference reference(const RefWeights& W, const RowMatrix<float>& x, const RowMatrix<float>& dy, Index k) {
  const Index T = x.rows(), d = W.d, ff = W.ff, E = W.E;
  const auto at = [](Index i) { return static_cast<std::size_t>(i); };
  const auto bias = [&](const std::vector<std::vector<double>>& b, Index e) { return W.bias && !b.empty() ? &b[at(e)] : nullptr; };
  Reference R;
  R.y.resize(at(T * d));
  R.dx.resize(at(T * d));
  std::vector<std::vector<Sum>> dw1(at(E), std::vector<Sum>(at(ff * d))), dw3 = dw1, dw2(at(E), std::vector<Sum>(at(d * ff)));
  std::vector<std::vector<Sum>> db1(at(E), std::vector<Sum>(at(ff))), db3 = db1, db2(at(E), std::vector<Sum>(at(d)));
  std::vector<Sum> dgate(at(E * d));

  for (Index t = 0; t < T; ++t) {
    const std::vector<double> xt(x.row(t).data(), x.row(t).data() + d);
    // Router: logits, softmax, top-k of the probabilities (lower id on ties), weights.
    std::vector<Val> z(at(E));
    for (Index e = 0; e < E; ++e) {
      Sum s;
      for (Index j = 0; j < d; ++j) s.add_product({W.gate(e, j), 0}, {xt[at(j)], 0});
      z[at(e)] = s.result();
    }
    const std::vector<Val> p = softmax(z);
    std::vector<Index> order(at(E));
    for (Index e = 0; e < E; ++e) order[at(e)] = e;
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p[at(a)].v > p[at(b)].v; });
    const Val& last = p[at(order[at(k - 1)])];
    if (k < E && !(last.v - p[at(order[at(k)])].v > last.e + p[at(order[at(k)])].e)) ++R.near_ties;
    const std::vector<Index> ids(order.begin(), order.begin() + k);
    Sum chosen_sum;
    for (const Index e : ids) chosen_sum.add(p[at(e)]);
    const Val psum = chosen_sum.result();
    std::vector<Val> w;
    for (const Index e : ids) w.push_back(W.renormalize ? div(p[at(e)], psum) : p[at(e)]);

    // Experts and the combine y = sum_s w_s o_s.
    const std::vector<double> x_in = stored_input(x.row(t).data(), d, W.storage);
    std::vector<std::vector<Val>> o(at(k));
    for (Index s = 0; s < k; ++s) {
      const Index e = ids[at(s)];
      const auto a = linear(W.w1f[at(e)], x_in, bias(W.b1, e));
      const auto b = W.gated ? linear(W.w3f[at(e)], x_in, bias(W.b3, e)) : std::vector<Val>();
      auto h = activate(a, b, W.gated);
      round_hidden(h, W.storage);
      o[at(s)] = linear(W.w2f[at(e)], h, bias(W.b2, e));
    }
    for (Index j = 0; j < d; ++j) {
      Sum s;
      for (Index q = 0; q < k; ++q) s.add_product(w[at(q)], o[at(q)][at(j)]);
      R.y[at(t * d + j)] = s.result();
    }

    // Backward. dL/dw_s = <dy_t, o_s>; the expert sees dys = w_s dy_t.
    std::vector<Sum> dx(at(d));
    std::vector<Val> g(at(k));
    for (Index s = 0; s < k; ++s) {
      const Index e = ids[at(s)];
      Sum dot;
      std::vector<Val> dys(at(d));
      for (Index j = 0; j < d; ++j) {
        const Val dyj{dy(t, j), 0};
        dot.add_product(dyj, o[at(s)][at(j)]);
        dys[at(j)] = mul(w[at(s)], dyj);
      }
      g[at(s)] = dot.result();
      // The bank recomputes its hidden values from the canonical weights and the unrounded token.
      const auto a = linear(W.w1[at(e)], xt, bias(W.b1, e));
      const auto b = W.gated ? linear(W.w3[at(e)], xt, bias(W.b3, e)) : std::vector<Val>();
      const auto h = activate(a, b, W.gated);
      for (Index oo = 0; oo < d; ++oo) {
        for (Index i = 0; i < ff; ++i) dw2[at(e)][at(oo * ff + i)].add_product(dys[at(oo)], h[at(i)]);
        db2[at(e)][at(oo)].add(dys[at(oo)]);
      }
      std::vector<Sum> dxs(at(d));
      for (Index i = 0; i < ff; ++i) {
        Sum dh_sum;
        for (Index oo = 0; oo < d; ++oo) dh_sum.add_product(dys[at(oo)], {W.w2[at(e)](oo, i), 0});
        const Val dh = dh_sum.result();
        const Val dg = W.gated ? mul(mul(dh, b[at(i)]), silu_derivative(a[at(i)])) : mul(dh, silu_derivative(a[at(i)]));
        const Val du = W.gated ? mul(dh, silu(a[at(i)])) : Val{};
        db1[at(e)][at(i)].add(dg);
        if (W.gated) db3[at(e)][at(i)].add(du);
        for (Index j = 0; j < d; ++j) {
          dw1[at(e)][at(i * d + j)].add_product(dg, {xt[at(j)], 0});
          dxs[at(j)].add_product(dg, {W.w1[at(e)](i, j), 0});
          if (W.gated) {
            dw3[at(e)][at(i * d + j)].add_product(du, {xt[at(j)], 0});
            dxs[at(j)].add_product(du, {W.w3[at(e)](i, j), 0});
          }
        }
      }
      for (Index j = 0; j < d; ++j) dx[at(j)].add(dxs[at(j)].result());
    }
    // Router backward, in the library's formula: renormalisation, then the softmax over all experts.
    if (W.renormalize) {
      Sum dot;
      for (Index s = 0; s < k; ++s) dot.add_product(g[at(s)], div(p[at(ids[at(s)])], psum));
      const Val dotv = dot.result();
      for (Index s = 0; s < k; ++s) g[at(s)] = div(sub(g[at(s)], dotv), psum);
    }
    std::vector<Val> ds(at(E));
    for (Index s = 0; s < k; ++s) ds[at(ids[at(s)])] = g[at(s)];
    Sum dot2;
    for (Index e = 0; e < E; ++e) dot2.add_product(ds[at(e)], p[at(e)]);
    const Val dot2v = dot2.result();
    for (Index e = 0; e < E; ++e) {
      const Val dz = mul(p[at(e)], sub(ds[at(e)], dot2v));
      for (Index j = 0; j < d; ++j) {
        dgate[at(e * d + j)].add_product(dz, {xt[at(j)], 0});
        dx[at(j)].add_product(dz, {W.gate(e, j), 0});
      }
    }
    for (Index j = 0; j < d; ++j) R.dx[at(t * d + j)] = dx[at(j)].result();
    R.ids.push_back(ids);
    R.w.push_back(w);
  }

  const auto flatten = [&](const std::vector<std::vector<Sum>>& per_expert) {
    std::vector<Val> out;
    for (const auto& m : per_expert)
      for (const Sum& s : m) out.push_back(s.result());
    return out;
  };
  std::vector<Val> gate;
  for (const Sum& s : dgate) gate.push_back(s.result());
  R.grads.emplace_back("router.gate", gate);
  R.grads.emplace_back("bank0.w1", flatten(dw1));
  if (W.gated) R.grads.emplace_back("bank0.w3", flatten(dw3));
  R.grads.emplace_back("bank0.w2", flatten(dw2));
  if (W.bias) {
    R.grads.emplace_back("bank0.b1", flatten(db1));
    if (W.gated) R.grads.emplace_back("bank0.b3", flatten(db3));
    R.grads.emplace_back("bank0.b2", flatten(db2));
  }
  return R;
}

// One layer's forward and backward results, in the reference's layout.
struct Run {
  std::vector<Index> ids;
  std::vector<float> w, y, dx;
  std::vector<std::pair<std::string, std::vector<float>>> grads;
  std::vector<Index> tokens_per_expert;
};

template <class Layer>
Run run(Layer& layer, const RowMatrix<float>& x, const RowMatrix<float>& dy) {
  Run r;
  moe::TrainingContext<float> ctx;
  RowMatrix<float> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  layer.zero_grad();
  const auto res = layer.forward(x, y, ctx);
  r.ids.assign(res.expert_ids.begin(), res.expert_ids.end());
  r.w.assign(res.expert_weights.begin(), res.expert_weights.end());
  r.tokens_per_expert.assign(res.tokens_per_expert.begin(), res.tokens_per_expert.end());
  layer.backward(dy, dx, ctx);
  r.y.assign(y.data(), y.data() + y.size());
  r.dx.assign(dx.data(), dx.data() + dx.size());
  layer.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) {
    r.grads.emplace_back(name, std::vector<float>(p.grad().data(), p.grad().data() + p.rows() * p.cols()));
  });
  return r;
}

// Largest |simd - scalar| / (2 e) and |path - reference| / e over a tensor; every element must be <= 1.
struct Worst {
  double pair = 0, simd = 0, scalar = 0;
};

// Elements where simd and scalar are more than 2 e apart or either is more than e from the reference.
Index count_outside(const std::vector<float>& simd, const std::vector<float>& plain, const std::vector<Val>& ref,
                    const std::string& what = "") {
  Index bad = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = ref[i].e, a = simd[i], b = plain[i];
    const bool ok = std::abs(a - b) <= 2 * e && std::abs(a - ref[i].v) <= e && std::abs(b - ref[i].v) <= e;
    if (!ok && bad++ == 0 && !what.empty())
      UNSCOPED_INFO(what << "[" << i << "]: simd " << a << ", scalar " << b << ", reference " << ref[i].v << " +- " << e);
  }
  return bad;
}

Worst compare(const std::string& what, const std::vector<float>& simd, const std::vector<float>& plain,
              const std::vector<Val>& ref) {
  INFO(what);
  REQUIRE(simd.size() == ref.size());
  REQUIRE(plain.size() == ref.size());
  Worst w;
  const Index bad = count_outside(simd, plain, ref, what);
  Index zeros = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = ref[i].e, a = simd[i], b = plain[i];
    if (e > 0) {
      w.pair = std::max(w.pair, std::abs(a - b) / (2 * e));
      w.simd = std::max(w.simd, std::abs(a - ref[i].v) / e);
      w.scalar = std::max(w.scalar, std::abs(b - ref[i].v) / e);
    }
    zeros += ref[i].v == 0.0 ? 1 : 0;
  }
  CHECK(bad == 0);
  CHECK(zeros * 10 < static_cast<Index>(ref.size()) * 3);  // RELIABILITY H4: not a comparison of zeros
  return w;
}

// Builds the layer on both instruction sets from one seed, runs both and the reference, compares.
template <class MakeSimd, class MakeScalar>
void check_layer(const std::string& name, const moe::MoEConfig& cfg, Storage storage, bool bias, MakeSimd make_simd,
                 MakeScalar make_scalar, Index n_tokens) {
  INFO(name << " (default_arch = " << kernels::default_arch::name() << ")");
  auto simd = make_simd(cfg);
  auto plain = make_scalar(cfg);
  simd.init(5);
  plain.init(5);
  moe::test::Rng rng(6);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, cfg.d_model);
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, n_tokens, cfg.d_model);
  const Run a = run(simd, x, dy), b = run(plain, x, dy);
  const RefWeights W = ref_weights(std::as_const(simd), storage, bias);
  const Reference R = reference(W, x, dy, cfg.top_k);
  REQUIRE(R.near_ties == 0);  // the data keeps every k-th / (k+1)-th gap above the error bounds

  // Same weights on both paths (init does not depend on the instruction set).
  {
    const Run again = run(plain, x, dy);
    REQUIRE(again.y == b.y);  // and the scalar path repeats itself
  }

  // Selection: the reference's sets (ids in either slot order when two chosen probabilities are close).
  Index experts_used = 0;
  for (const Index n : a.tokens_per_expert) experts_used += n > 0 ? 1 : 0;
  CHECK(experts_used * 2 >= cfg.n_experts);  // H4: most experts get tokens
  REQUIRE(a.tokens_per_expert == b.tokens_per_expert);
  const Index k = cfg.top_k;
  std::vector<Val> ref_w;
  std::vector<float> w_simd, w_plain;
  for (Index t = 0; t < n_tokens; ++t) {
    for (Index s = 0; s < k; ++s) {
      const auto slot = static_cast<std::size_t>(t * k + s);
      const auto& ids = R.ids[static_cast<std::size_t>(t)];
      const auto it = std::find(ids.begin(), ids.end(), a.ids[slot]);
      INFO("token " << t << " slot " << s);
      REQUIRE(it != ids.end());
      // The scalar path holds the same expert in some slot of the token.
      const auto pb = std::find(b.ids.begin() + t * k, b.ids.begin() + (t + 1) * k, a.ids[slot]);
      REQUIRE(pb != b.ids.begin() + (t + 1) * k);
      ref_w.push_back(R.w[static_cast<std::size_t>(t)][static_cast<std::size_t>(it - ids.begin())]);
      w_simd.push_back(a.w[slot]);
      w_plain.push_back(b.w[static_cast<std::size_t>(pb - b.ids.begin())]);
    }
  }
  std::vector<std::pair<std::string, Worst>> worst;
  worst.emplace_back("weights", compare("routing weights", w_simd, w_plain, ref_w));
  worst.emplace_back("y", compare("y", a.y, b.y, R.y));
  worst.emplace_back("dx", compare("dx", a.dx, b.dx, R.dx));
  REQUIRE(a.grads.size() == R.grads.size());
  for (std::size_t i = 0; i < R.grads.size(); ++i) {
    REQUIRE(a.grads[i].first == R.grads[i].first);
    REQUIRE(b.grads[i].first == R.grads[i].first);
    worst.emplace_back(R.grads[i].first, compare(R.grads[i].first, a.grads[i].second, b.grads[i].second, R.grads[i].second));
  }
  if (storage == Storage::native) {
    std::vector<double> ref_y;
    for (const Val& v : R.y) ref_y.push_back(v.v);
    CHECK(moe::test::nmse(ref_y.data(), a.y.data(), ref_y.size()) <= 1e-7);  // N1 whole-tensor criterion
    CHECK(moe::test::nmse(ref_y.data(), b.y.data(), ref_y.size()) <= 1e-7);
  }
  // Negative control: the comparison sees one output channel of the busiest expert off by 1 % (f32; its
  // median bound on y is ~5e-4 relative) or by 100 % (bf16, int8: their bounds are dominated by the
  // rounding of the hidden activations, which may differ between the paths: ~3 % and ~25 % relative).
  Index busiest = 0;
  for (Index e = 0; e < cfg.n_experts; ++e)
    if (b.tokens_per_expert[static_cast<std::size_t>(e)] > b.tokens_per_expert[static_cast<std::size_t>(busiest)]) busiest = e;
  const float factor = storage == Storage::native ? 1.01f : 2.0f;
  for (Index i = 0; i < plain.template bank<0>().d_ff(); ++i) plain.template bank<0>().w2(busiest)(0, i) *= factor;
  CHECK(count_outside(a.y, run(plain, x, dy).y, R.y) > 0);
  std::vector<double> relative;
  for (const Val& v : R.y) relative.push_back(v.e / std::abs(v.v));
  std::nth_element(relative.begin(), relative.begin() + static_cast<std::ptrdiff_t>(relative.size() / 2), relative.end());
  std::ostringstream report;
  report << "\n  median bound on y, relative: " << relative[relative.size() / 2];
  for (const auto& [what, w] : worst)
    report << "\n  " << what << ": |simd - scalar| / 2e " << w.pair << ", |simd - ref| / e " << w.simd
           << ", |scalar - ref| / e " << w.scalar;
  WARN(name << " on " << kernels::default_arch::name() << ", worst observed error / derived bound:" << report.str());
}

template <class Arch>
using Mixtral = moe::MoELayer<moe::routers::TopKSoftmax<float, Arch>, moe::experts::FFN<float, kernels::SiLU, true, Arch>>;
template <class Arch>
using PlainBiased = moe::MoELayer<moe::routers::TopKSoftmax<float, Arch>, moe::experts::FFN<float, kernels::SiLU, false, Arch>>;
template <class Arch>
using SwiGLUBF16 = moe::MoELayer<moe::routers::TopKSoftmax<float, Arch>,
                                 moe::experts::FFN<float, kernels::SiLU, true, Arch, kernels::BF16Weights>>;
template <class Arch>
using SwiGLUInt8 = moe::MoELayer<moe::routers::TopKSoftmax<float, Arch>,
                                 moe::experts::FFN<float, kernels::SiLU, true, Arch, kernels::Int8Weights>>;

// SIMD-width edges: d_model and d_ff are not multiples of any vector width.
const moe::MoEConfig k_shape{.d_model = 45, .d_ff = 70, .n_experts = 8, .top_k = 2};

}  // namespace

TEST_CASE("Layer on default_arch vs scalar: Mixtral (top-2 renormalised, SwiGLU f32), forward and backward",
          "[layer][simd]") {
  check_layer(
      "Mixtral f32", k_shape, Storage::native, false,
      [](const moe::MoEConfig& c) { return Mixtral<kernels::default_arch>(c); },
      [](const moe::MoEConfig& c) { return Mixtral<kernels::scalar>(c); }, 61);
}

TEST_CASE("Layer on default_arch vs scalar: top-3 raw softmax (Qwen2), plain SiLU FFN with biases", "[layer][simd]") {
  moe::MoEConfig cfg = k_shape;
  cfg.top_k = 3;
  check_layer(
      "Qwen2-style raw top-3, plain FFN with biases", cfg, Storage::native, true,
      [](const moe::MoEConfig& c) {
        using L = PlainBiased<kernels::default_arch>;
        return L(moe::routers::TopKSoftmax<float, kernels::default_arch>(c, {.renormalize = false}),
                 moe::experts::FFN<float, kernels::SiLU, false, kernels::default_arch>(c, {.bias = true}));
      },
      [](const moe::MoEConfig& c) {
        using L = PlainBiased<kernels::scalar>;
        return L(moe::routers::TopKSoftmax<float, kernels::scalar>(c, {.renormalize = false}),
                 moe::experts::FFN<float, kernels::SiLU, false, kernels::scalar>(c, {.bias = true}));
      },
      53);
}

TEST_CASE("Layer on default_arch vs scalar: SwiGLU with bf16 and with int8 weight storage", "[layer][simd]") {
  check_layer(
      "SwiGLU bf16 storage", k_shape, Storage::bf16, false,
      [](const moe::MoEConfig& c) { return SwiGLUBF16<kernels::default_arch>(c); },
      [](const moe::MoEConfig& c) { return SwiGLUBF16<kernels::scalar>(c); }, 47);
  check_layer(
      "SwiGLU int8 storage", k_shape, Storage::int8, false,
      [](const moe::MoEConfig& c) { return SwiGLUInt8<kernels::default_arch>(c); },
      [](const moe::MoEConfig& c) { return SwiGLUInt8<kernels::scalar>(c); }, 47);
}
