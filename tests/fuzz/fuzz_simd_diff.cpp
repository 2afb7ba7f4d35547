// RELIABILITY F4 / D3: differential fuzzing of the native SIMD arch against the scalar fallback.
//
// Bytes -> a tiny layer: n_tokens <= 12, n_experts <= 40 and top_k <= min(n_experts, 20) (router rows that fill
// whole AVX2 / AVX-512 registers and leave tails in softmax_row and top_k), d_model and d_ff <= 20 (the same in
// the expert GEMMs); a softmax top-k router (renormalised or not, or softmax after top-k; temperature); FFN
// experts (ReLU or SiLU, gated or plain, with or without biases); values in about [-2, 2] (exact small integers
// and ties included); dy. The same layer is instantiated twice in one binary,
//   MoELayer<TopKRouter<float, A>, FFN<float, Act, Gated, A>>, A = kernels::default_arch and kernels::scalar,
// given the same parameters, and runs a training forward and a backward.
//
// Oracle:
//  - both throw moe::Error or neither (x or dy holding NaN / ±inf must throw, in both);
//  - a double reference of the layer carries, for every value it computes, a bound e on how far ANY correct f32
//    implementation may be from it, propagated to first order through every operation: RELIABILITY N1's
//    γ_{K+2}·Σ|terms| for every sum of K products in any order, with or without FMA; u per element-wise
//    operation; in the softmax, |ln(s(ẑ)/s(z))| <= 2 max|ẑ - z| for the inputs' errors plus the rounding of
//    (z - max), exp within 10 eps32 (RELIABILITY N3), the f32 lane sum (γ_n) and the scaling; the activations'
//    documented accuracy (tests/kernels/activation_test.cpp: 10 eps32 |f| + 2 eps32 |x f'(x)| + 100 FLT_MIN) and
//    Lipschitz constants (ReLU 1, SiLU 1.1; derivatives: SiLU' 1/2, ReLU' a 0/1 jump taken as 1/2 ± 1/2 when the
//    input's interval straddles 0); 2^-149 per operation for subnormal rounding; 2^-52 relative for the
//    reference's own rounding. (GELU is left to the kernel tests: its derivative's accuracy is not documented.)
//  - selection: a token's chosen set must be the reference's top-k unless the k-th and (k+1)-th key intervals
//    overlap (a near-tie); the two archs may differ only on such tokens;
//  - outputs y, the input gradient dx, the weights the router returned and (when no token's choice differs)
//    every parameter gradient: each arch within e of the reference, hence |native - scalar| <= 2e.
// A violated oracle aborts with a message naming the tensor, the element, both values and the bound. With
// MOE_FUZZ_STATS set, the replay prints how tight the bound was (the largest |arch - reference| / e seen).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <moe/moe.hpp>

#include "fuzz_support.hpp"

namespace {

using moe::Index;
using moe::fuzz::ByteReader;
using moe::fuzz::k_u32;
namespace routers = moe::routers;
namespace experts = moe::experts;
namespace kernels = moe::kernels;
using Matrix = moe::RowMatrix<float>;

constexpr Index k_max_tokens = 12;
constexpr Index k_max_experts = 40;  // router rows of 1..40 scores: whole AVX-512 / AVX2 registers and tails
constexpr Index k_max_top_k = 20;
constexpr Index k_max_width = 20;

// ---------------------------------------------------------------------------------------------------------
// A value of the double reference with a bound on the distance of any correct f32 implementation from it.

struct EV {
  double v = 0;  // reference value
  double e = 0;  // |f32 result - v| <= e
};

constexpr double k_u = k_u32;
constexpr double k_eps32 = 2 * k_u32;
constexpr double k_sub = 0x1.0p-149;   // absolute rounding error per operation in the subnormal range
constexpr double k_u64 = 0x1.0p-52;    // the reference's own rounding, relative (generous)
constexpr double k_exp_rel = 10 * k_eps32;  // documented exp accuracy in the softmax (RELIABILITY N3)

double gamma(Index n) { return double(n) * k_u / (1.0 - double(n) * k_u); }

EV exact(double v) { return {v, 0.0}; }

EV rounded(double v, double e) { return {v, e + k_u * (std::abs(v) + e) + k_u64 * std::abs(v) + k_sub}; }

EV add(EV a, EV b) { return rounded(a.v + b.v, a.e + b.e); }
EV sub(EV a, EV b) { return rounded(a.v - b.v, a.e + b.e); }
EV mul(EV a, EV b) { return rounded(a.v * b.v, std::abs(a.v) * b.e + std::abs(b.v) * a.e + a.e * b.e); }
EV div(EV a, EV b) {
  const double v = a.v / b.v, den = std::abs(b.v) - b.e;
  if (!(den > 0)) return {v, std::numeric_limits<double>::infinity()};
  return rounded(v, (a.e + std::abs(v) * b.e) / den);
}

// Σ a_i b_i over K terms, computed in any order with or without FMA: the carried input errors plus
// γ_{K+2}·Σ|a_i b_i| around the perturbed inputs (RELIABILITY N1). A bias or an accumulation into an existing
// value is one more term (times 1). Accumulated term by term (no allocation: the reference runs per input).
class Dot {
 public:
  void add(EV a, EV b) {
    v_ += a.v * b.v;
    carried_ += std::abs(a.v) * b.e + std::abs(b.v) * a.e + a.e * b.e;
    mag_ += (std::abs(a.v) + a.e) * (std::abs(b.v) + b.e);
    ++K_;
  }
  void add(double a, double b) { add(exact(a), exact(b)); }
  EV result() const { return {v_, carried_ + gamma(K_ + 2) * mag_ + double(K_ + 2) * (k_u64 * mag_ + k_sub)}; }

 private:
  double v_ = 0, carried_ = 0, mag_ = 0;
  Index K_ = 0;
};

EV dot(const std::vector<EV>& a, const std::vector<EV>& b) {
  Dot acc;
  for (std::size_t i = 0; i < a.size(); ++i) acc.add(a[i], b[i]);
  return acc.result();
}

// Softmax of a row of EVs, as kernels::softmax_row computes it (max shift, exp, sum, one scale), within the
// perturbation of its inputs (|ln(s(ẑ)/s(z))| <= 2 max e) and its own rounding: (ẑ_j - m) rounded (u|ẑ_j - m|
// in the exponent), exp (k_exp_rel), the sum in f32 lanes (γ_n), 1/sum and the scale (2u).
std::vector<EV> softmax(const std::vector<EV>& z) {
  const auto n = static_cast<Index>(z.size());
  double m = -std::numeric_limits<double>::infinity(), delta = 0;
  for (const EV& x : z) {
    m = std::max(m, x.v);
    delta = std::max(delta, x.e);
  }
  std::vector<double> p(z.size());
  double s = 0;
  for (std::size_t j = 0; j < z.size(); ++j) s += p[j] = std::exp(z[j].v - m);
  std::vector<double> a(z.size());
  double avg = 0;
  for (std::size_t j = 0; j < z.size(); ++j) {
    p[j] /= s;
    a[j] = k_u * (std::abs(z[j].v - m) + 2 * delta) + k_exp_rel;
    avg += p[j] * a[j];
  }
  std::vector<EV> out(z.size());
  for (std::size_t j = 0; j < z.size(); ++j) {
    const double log_bound = 2 * delta + a[j] + 1.01 * avg + gamma(n) + 3 * k_u + 4 * k_u64;
    const double e = p[j] * std::expm1(std::min(log_bound, 700.0)) + double(n + 2) * 0x1.0p-126;
    out[j] = {p[j], std::min(e, 2.0)};
  }
  return out;
}

// Activations (documented accuracy of kernels/simd/activation.hpp, tests/kernels/activation_test.cpp).
struct ReLUModel {
  static EV apply(EV g) { return {std::max(g.v, 0.0), g.e}; }
  static EV derivative(EV g) {
    if (g.v - g.e > 0) return exact(1.0);
    if (g.v + g.e <= 0) return exact(0.0);
    return {0.5, 0.5};  // the input's interval straddles the kink
  }
};
struct SiLUModel {
  static double f(double x) { return x / (1.0 + std::exp(-x)); }
  static double df(double x) {
    const double s = 1.0 / (1.0 + std::exp(-x));
    return s * (1.0 + x * (1.0 - s));
  }
  static EV apply(EV g) {
    constexpr double lipschitz = 1.1;  // max |silu'| = 1.0998
    const double v = f(g.v);
    const double impl = 10 * k_eps32 * (std::abs(v) + lipschitz * g.e) +
                        2 * k_eps32 * (std::abs(g.v) + g.e) * lipschitz + 100 * double(FLT_MIN);
    return {v, lipschitz * g.e + impl + k_u64 * std::abs(v)};
  }
  static EV derivative(EV g) {
    // max |silu''| = 1/2; the f32 formula s (1 + x (1 - s)) with s from std::exp: within 64 u (1 + |x|).
    return {df(g.v), 0.5 * g.e + 64 * k_u * (1.0 + std::abs(g.v) + g.e)};
  }
};

// ---------------------------------------------------------------------------------------------------------
// The case.

struct Shape {
  Index T = 0, E = 1, k = 1, d = 1, d_ff = 1;
  bool gated = true, relu = false, bias = false;
  routers::TopKOptions options;
};

// Parameters by name (the layer's visit order), row-major.
using Params = std::map<std::string, Matrix>;

float moderate(ByteReader& in, std::uint8_t mode) {
  switch (mode) {
    case 0: return static_cast<float>(in.below(5)) - 2.0f;                        // small integers: ties
    case 1: return static_cast<float>(static_cast<int>(in.below(17)) - 8) * 0.25f;  // quarters
    default: return static_cast<float>(2.0 * in.uniform() - 1.0);
  }
}

void fill_moderate(ByteReader& in, Matrix& m) {
  const std::uint8_t mode = in.byte() % 4;
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = moderate(in, mode);
}

// x or dy: moderate, and now and then a NaN or ±inf (the layer must reject it, in both archs).
void fill_input(ByteReader& in, Matrix& m) {
  fill_moderate(in, m);
  if (m.size() > 0 && in.byte() < 20) {
    static constexpr float k_bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity()};
    m.data()[in.below(m.size())] = in.pick(k_bad);
  }
}

struct ArchRun {
  bool threw_forward = false, threw_backward = false;
  Matrix y, dx;
  std::vector<Index> ids;  // (T, k)
  std::vector<float> w;    // (T, k)
  Params grads;
};

template <class Layer>
void set_parameters(Layer& layer, const Params& params) {
  layer.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) {
    const Matrix& src = params.at(name);
    const auto v = p.value();
    for (Index i = 0; i < v.rows(); ++i)
      for (Index j = 0; j < v.cols(); ++j) v(i, j) = src(i, j);
  });
}

template <class Arch, class Act, bool Gated>
ArchRun run_arch(const Shape& s, const Params& params, const Matrix& x, const Matrix& dy) {
  using Layer = moe::MoELayer<routers::TopKRouter<float, Arch>, experts::FFN<float, Act, Gated, Arch>>;
  const moe::MoEConfig cfg{.d_model = s.d, .d_ff = s.d_ff, .n_experts = s.E, .top_k = s.k};
  Layer layer(routers::TopKRouter<float, Arch>(cfg, s.options), experts::FFN<float, Act, Gated, Arch>(cfg, {.bias = s.bias}));
  set_parameters(layer, params);
  ArchRun r;
  r.y = Matrix::Constant(s.T, s.d, std::numeric_limits<float>::quiet_NaN());
  r.dx = Matrix::Constant(s.T, s.d, std::numeric_limits<float>::quiet_NaN());
  moe::TrainingContext<float> ctx;
  try {
    const auto res = layer.forward(x, r.y, ctx);
    r.ids.assign(res.expert_ids.begin(), res.expert_ids.end());
    r.w.assign(res.expert_weights.begin(), res.expert_weights.end());
  } catch (const moe::Error&) {
    r.threw_forward = true;
    return r;
  }
  try {
    layer.backward(dy, r.dx, ctx);
  } catch (const moe::Error&) {
    r.threw_backward = true;
    return r;
  }
  layer.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) {
    const auto g = p.grad();
    Matrix m(g.rows(), g.cols());
    for (Index i = 0; i < g.rows(); ++i)
      for (Index j = 0; j < g.cols(); ++j) m(i, j) = g(i, j);
    r.grads[name] = m;
  });
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// The reference, token by token, with the choice each arch made (when they agree).

struct TokenRef {
  std::vector<EV> keys;        // (E) selection keys: scores, or scaled logits with softmax after top-k
  std::vector<EV> scores;      // (E) the saved row (scores s, or the scaled logits)
  std::vector<Index> chosen;   // (k) expert of each slot, in the arch's slot order
  std::vector<EV> w;           // (k) weights
  // Per slot: the expert's pre-activations, activations and hidden row, and its output.
  std::vector<std::vector<EV>> g, up, act, h, ye;
  std::vector<EV> y;           // (d)
};

struct Reference {
  Reference(const Shape& shape, const Params& params, const Matrix& tokens)
      : s(shape), x(tokens), wg(&params.at("router.gate")), w1_(&params.at("bank0.w1")), w2_(&params.at("bank0.w2")),
        w3_(find(params, "bank0.w3")), b1_(find(params, "bank0.b1")), b3_(find(params, "bank0.b3")),
        b2_(find(params, "bank0.b2")) {}

  const Shape& s;
  const Matrix& x;
  const Matrix* wg;

  float w1(Index e, Index c, Index i) const { return (*w1_)(e * s.d_ff + c, i); }
  float w3(Index e, Index c, Index i) const { return (*w3_)(e * s.d_ff + c, i); }
  float w2(Index e, Index o, Index c) const { return (*w2_)(e * s.d + o, c); }
  float b1(Index e, Index c) const { return (*b1_)(e, c); }
  float b3(Index e, Index c) const { return (*b3_)(e, c); }
  float b2(Index e, Index o) const { return (*b2_)(e, o); }

  // Logits, scaled logits and keys of token t.
  void route(Index t, TokenRef& r) const {
    const Matrix& g = *wg;
    std::vector<EV> z(static_cast<std::size_t>(s.E));
    for (Index e = 0; e < s.E; ++e) {
      Dot acc;
      for (Index i = 0; i < s.d; ++i) acc.add(x(t, i), g(e, i));
      z[static_cast<std::size_t>(e)] = acc.result();
      if (s.options.temperature != 1.0)
        z[static_cast<std::size_t>(e)] = mul(z[static_cast<std::size_t>(e)], exact(static_cast<float>(1.0 / s.options.temperature)));
    }
    r.scores = s.options.softmax_after_top_k ? z : softmax(z);
    r.keys = r.scores;
  }

  // The reference top-k set (by value, ties to the lower id) and whether its boundary is a near-tie.
  std::vector<Index> top_set(const TokenRef& r, bool& near_tie) const {
    std::vector<Index> order(static_cast<std::size_t>(s.E));
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
      return r.keys[static_cast<std::size_t>(a)].v > r.keys[static_cast<std::size_t>(b)].v;
    });
    near_tie = false;
    if (s.k < s.E) {
      double low_in = std::numeric_limits<double>::infinity(), high_out = -std::numeric_limits<double>::infinity();
      for (Index j = 0; j < s.E; ++j) {
        const EV& key = r.keys[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])];
        if (j < s.k) low_in = std::min(low_in, key.v - key.e);
        else high_out = std::max(high_out, key.v + key.e);
      }
      near_tie = !(low_in > high_out);
    }
    order.resize(static_cast<std::size_t>(s.k));
    std::sort(order.begin(), order.end());
    return order;
  }

  static const Matrix* find(const Params& params, const char* name) {
    const auto it = params.find(name);
    return it == params.end() ? nullptr : &it->second;
  }
  const Matrix* w1_;
  const Matrix* w2_;
  const Matrix* w3_;
  const Matrix* b1_;
  const Matrix* b3_;
  const Matrix* b2_;

  template <class Act>
  void forward(Index t, TokenRef& r) const {
    const Index k = s.k, d = s.d, F = s.d_ff;
    // Weights.
    std::vector<EV> u;
    for (Index e : r.chosen) u.push_back(r.scores[static_cast<std::size_t>(e)]);
    if (s.options.softmax_after_top_k) {
      r.w = softmax(u);
    } else if (s.options.renormalize) {
      EV total = u[0];
      for (Index j = 1; j < k; ++j) total = add(total, u[static_cast<std::size_t>(j)]);
      r.w.clear();
      for (const EV& ui : u) {
        EV q = div(ui, total);
        q.e = std::min(q.e, 2.0);  // a weight is in [0, 1]
        r.w.push_back(q);
      }
    } else {
      r.w = u;
    }
    // Experts and the combine.
    r.g.assign(static_cast<std::size_t>(k), {});
    r.up = r.act = r.h = r.ye = r.g;
    for (Index j = 0; j < k; ++j) {
      const Index e = r.chosen[static_cast<std::size_t>(j)];
      auto& g = r.g[static_cast<std::size_t>(j)];
      auto& up = r.up[static_cast<std::size_t>(j)];
      auto& act = r.act[static_cast<std::size_t>(j)];
      auto& h = r.h[static_cast<std::size_t>(j)];
      auto& ye = r.ye[static_cast<std::size_t>(j)];
      for (Index c = 0; c < F; ++c) {
        Dot gate, lin;
        for (Index i = 0; i < d; ++i) {
          gate.add(x(t, i), w1(e, c, i));
          if (s.gated) lin.add(x(t, i), w3(e, c, i));
        }
        if (s.bias) {  // the bias as one more term
          gate.add(1.0, b1(e, c));
          if (s.gated) lin.add(1.0, b3(e, c));
        }
        const EV gc = gate.result(), uc = s.gated ? lin.result() : EV{};
        g.push_back(gc);
        up.push_back(uc);
        act.push_back(Act::apply(gc));
        h.push_back(s.gated ? mul(act.back(), uc) : act.back());
      }
      for (Index o = 0; o < d; ++o) {
        Dot out;
        for (Index c = 0; c < F; ++c) out.add(exact(w2(e, o, c)), h[static_cast<std::size_t>(c)]);
        if (s.bias) out.add(b2(e, o), 1.0);
        ye.push_back(out.result());
      }
    }
    r.y.clear();
    for (Index o = 0; o < d; ++o) {
      Dot combine;
      for (Index j = 0; j < k; ++j)
        combine.add(r.w[static_cast<std::size_t>(j)], r.ye[static_cast<std::size_t>(j)][static_cast<std::size_t>(o)]);
      r.y.push_back(combine.result());
    }
  }
};

// Gradients of the reference, for the tokens of `tok` (each with its arch's choice).
struct Grads {
  std::vector<std::vector<EV>> dx;                            // (T, d)
  std::map<std::string, std::vector<std::vector<EV>>> param;  // name -> rows of EVs, the parameter's shape
};

template <class Act>
Grads reference_backward(const Reference& ref, std::vector<TokenRef>& tok, const Matrix& dy) {
  const Shape& s = ref.s;
  const Index T = s.T, k = s.k, d = s.d, F = s.d_ff, E = s.E;
  const auto at = [](auto& v, Index i) -> auto& { return v[static_cast<std::size_t>(i)]; };
  Grads out;
  out.dx.assign(static_cast<std::size_t>(T), std::vector<EV>(static_cast<std::size_t>(d)));
  // Per token and slot: dL/d(expert output) dys (d), dL/d(gate pre-activation) dg and dL/d(up) du (d_ff).
  std::vector<std::vector<std::vector<EV>>> dys(static_cast<std::size_t>(T)), dg = dys, du = dys;
  std::vector<std::vector<EV>> dz(static_cast<std::size_t>(T), std::vector<EV>(static_cast<std::size_t>(E)));
  std::vector<EV> dweights, g, dgs, dus;
  std::vector<std::vector<EV>> dxs;  // (k, d) each slot's dL/d(grouped row)
  const float inv_temperature = static_cast<float>(1.0 / s.options.temperature);
  for (Index t = 0; t < T; ++t) {
    TokenRef& r = at(tok, t);
    dweights.assign(static_cast<std::size_t>(k), EV{});
    dxs.assign(static_cast<std::size_t>(k), std::vector<EV>(static_cast<std::size_t>(d)));
    for (Index j = 0; j < k; ++j) {
      const Index e = at(r.chosen, j);
      Dot dw;  // dL/dw = <dy, expert output>
      for (Index o = 0; o < d; ++o) dw.add(exact(dy(t, o)), at(at(r.ye, j), o));
      at(dweights, j) = dw.result();
      std::vector<EV> dy_slot(static_cast<std::size_t>(d));
      for (Index o = 0; o < d; ++o) at(dy_slot, o) = mul(at(r.w, j), exact(dy(t, o)));
      dgs.clear();
      dus.clear();
      for (Index c = 0; c < F; ++c) {
        Dot dh;  // dh = dys W2 (K = d)
        for (Index o = 0; o < d; ++o) dh.add(at(dy_slot, o), exact(ref.w2(e, o, c)));
        const EV dhc = dh.result(), gc = at(at(r.g, j), c);
        if (s.gated) {
          dus.push_back(mul(dhc, Act::apply(gc)));
          dgs.push_back(mul(mul(dhc, at(at(r.up, j), c)), Act::derivative(gc)));
        } else {
          dgs.push_back(mul(dhc, Act::derivative(gc)));
        }
      }
      for (Index i = 0; i < d; ++i) {
        Dot row;  // dx row = dg W1 (+ du W3): K = d_ff (2 d_ff)
        for (Index c = 0; c < F; ++c) row.add(at(dgs, c), exact(ref.w1(e, c, i)));
        if (s.gated)
          for (Index c = 0; c < F; ++c) row.add(at(dus, c), exact(ref.w3(e, c, i)));
        at(at(dxs, j), i) = row.result();
      }
      at(dys, t).push_back(std::move(dy_slot));
      at(dg, t).push_back(dgs);
      at(du, t).push_back(dus);
    }
    // Router: dlogits from dweights (TopKRouter::logits_backward).
    g = dweights;
    std::vector<EV>& dzt = at(dz, t);
    for (auto& v : dzt) v = exact(0.0);
    if (s.options.softmax_after_top_k) {
      const EV dotv = dot(g, r.w);
      for (Index j = 0; j < k; ++j) at(g, j) = mul(at(r.w, j), sub(at(g, j), dotv));
      for (Index j = 0; j < k; ++j) at(dzt, at(r.chosen, j)) = at(g, j);
    } else {
      if (s.options.renormalize) {
        EV total = at(r.scores, at(r.chosen, 0));
        for (Index j = 1; j < k; ++j) total = add(total, at(r.scores, at(r.chosen, j)));
        Dot dotv;
        for (Index j = 0; j < k; ++j) dotv.add(at(g, j), div(at(r.scores, at(r.chosen, j)), total));
        const EV dv = dotv.result();
        for (Index j = 0; j < k; ++j) at(g, j) = div(sub(at(g, j), dv), total);
      }
      for (Index j = 0; j < k; ++j) at(dzt, at(r.chosen, j)) = at(g, j);
      const EV dotv = dot(dzt, r.scores);
      for (Index e = 0; e < E; ++e) at(dzt, e) = mul(at(r.scores, e), sub(at(dzt, e), dotv));
    }
    if (s.options.temperature != 1.0)
      for (auto& v : dzt) v = mul(v, exact(inv_temperature));
    // dx = Σ_slots dxs, then += dz Wg (K = E, plus the accumulation).
    const Matrix& wg = *ref.wg;
    for (Index i = 0; i < d; ++i) {
      EV expert_part = at(at(dxs, 0), i);
      if (k > 1) {
        Dot sum;
        for (Index j = 0; j < k; ++j) sum.add(at(at(dxs, j), i), exact(1.0));
        expert_part = sum.result();
      }
      Dot total;
      for (Index e = 0; e < E; ++e) total.add(at(dzt, e), exact(wg(e, i)));
      total.add(expert_part, exact(1.0));
      at(at(out.dx, t), i) = total.result();
    }
  }
  // Parameter gradients: sums over tokens (router) or over each expert's rows (banks), rows in token order.
  auto& gwg = out.param["router.gate"];
  gwg.assign(static_cast<std::size_t>(E), std::vector<EV>(static_cast<std::size_t>(d)));
  for (Index e = 0; e < E; ++e)
    for (Index i = 0; i < d; ++i) {
      Dot acc;
      for (Index t = 0; t < T; ++t) acc.add(at(at(dz, t), e), exact(ref.x(t, i)));
      at(at(gwg, e), i) = acc.result();
    }
  auto& gw1 = out.param["bank0.w1"];
  auto& gw3 = out.param["bank0.w3"];
  auto& gw2 = out.param["bank0.w2"];
  auto& gb1 = out.param["bank0.b1"];
  auto& gb3 = out.param["bank0.b3"];
  auto& gb2 = out.param["bank0.b2"];
  gw1.assign(static_cast<std::size_t>(E * F), std::vector<EV>(static_cast<std::size_t>(d)));
  gw3 = gw1;
  gw2.assign(static_cast<std::size_t>(E * d), std::vector<EV>(static_cast<std::size_t>(F)));
  gb1.assign(static_cast<std::size_t>(E), std::vector<EV>(static_cast<std::size_t>(F)));
  gb3 = gb1;
  gb2.assign(static_cast<std::size_t>(E), std::vector<EV>(static_cast<std::size_t>(d)));
  std::vector<std::pair<Index, Index>> rows;  // (token, slot) of one expert
  for (Index e = 0; e < E; ++e) {
    rows.clear();
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < k; ++j)
        if (at(at(tok, t).chosen, j) == e) rows.emplace_back(t, j);
    for (Index c = 0; c < F; ++c) {
      for (Index i = 0; i < d; ++i) {
        Dot w1, w3;
        for (const auto& [t, j] : rows) {
          w1.add(at(at(at(dg, t), j), c), exact(ref.x(t, i)));
          if (s.gated) w3.add(at(at(at(du, t), j), c), exact(ref.x(t, i)));
        }
        at(at(gw1, e * F + c), i) = w1.result();
        if (s.gated) at(at(gw3, e * F + c), i) = w3.result();
      }
      Dot b1, b3;
      for (const auto& [t, j] : rows) {
        b1.add(at(at(at(dg, t), j), c), exact(1.0));
        if (s.gated) b3.add(at(at(at(du, t), j), c), exact(1.0));
      }
      at(at(gb1, e), c) = b1.result();
      if (s.gated) at(at(gb3, e), c) = b3.result();
    }
    for (Index o = 0; o < d; ++o) {
      for (Index c = 0; c < F; ++c) {
        Dot w2;
        for (const auto& [t, j] : rows) w2.add(at(at(at(dys, t), j), o), at(at(at(tok, t).h, j), c));
        at(at(gw2, e * d + o), c) = w2.result();
      }
      Dot b2;
      for (const auto& [t, j] : rows) b2.add(at(at(at(dys, t), j), o), exact(1.0));
      at(at(gb2, e), o) = b2.result();
    }
  }
  return out;
}

// With MOE_FUZZ_STATS set, how tight the bound is: the largest |arch - reference| / e and |native - scalar| / e
// seen, and how many values were compared and how many differed between the archs, printed at exit.
struct Tightness {
  double worst_ref = 0, worst_diff = 0;
  std::size_t compared = 0, differing = 0;
  ~Tightness() {
    if (std::getenv("MOE_FUZZ_STATS") != nullptr)
      std::fprintf(stderr, "fuzz_simd_diff: %zu values compared, %zu differ between archs; worst |arch - ref| / e = %.3g, "
                           "worst |native - scalar| / e = %.3g\n", compared, differing, worst_ref, worst_diff);
  }
};
Tightness tightness;

// |native - reference| <= e and |scalar - reference| <= e (so |native - scalar| <= 2e).
void check_close(const char* what, Index i, Index j, float native, float scalar, EV ref) {
  const double dn = std::abs(double(native) - ref.v), ds = std::abs(double(scalar) - ref.v);
  ++tightness.compared;
  tightness.differing += native != scalar ? 1 : 0;
  if (ref.e > 0) {
    tightness.worst_ref = std::max(tightness.worst_ref, std::max(dn, ds) / ref.e);
    tightness.worst_diff = std::max(tightness.worst_diff, std::abs(double(native) - double(scalar)) / ref.e);
  }
  MOE_FUZZ_CHECK(std::abs(double(native) - double(scalar)) <= 2 * ref.e,
                 what << "(" << i << ", " << j << "): native " << native << " and scalar " << scalar << " differ by "
                      << std::abs(double(native) - double(scalar)) << " > 2e = " << 2 * ref.e << " (reference " << ref.v << ")");
  MOE_FUZZ_CHECK(dn <= ref.e && ds <= ref.e, what << "(" << i << ", " << j << "): native " << native << ", scalar " << scalar
                                                  << ", reference " << ref.v << " ± " << ref.e);
}

std::vector<Index> sorted_set(const std::vector<Index>& ids, Index t, Index k) {
  std::vector<Index> v(ids.begin() + t * k, ids.begin() + (t + 1) * k);
  std::sort(v.begin(), v.end());
  return v;
}

template <class Act, bool Gated>
void run_case(const Shape& s, const Params& params, const Matrix& x, const Matrix& dy) {
  using ActModel = std::conditional_t<std::is_same_v<Act, kernels::ReLU>, ReLUModel, SiLUModel>;
  const ArchRun native = run_arch<kernels::default_arch, Act, Gated>(s, params, x, dy);
  const ArchRun scalar = run_arch<kernels::scalar, Act, Gated>(s, params, x, dy);
  const bool x_finite = moe::fuzz::all_finite(x.data(), static_cast<std::size_t>(x.size()));
  const bool dy_finite = moe::fuzz::all_finite(dy.data(), static_cast<std::size_t>(dy.size()));
  MOE_FUZZ_CHECK(native.threw_forward == scalar.threw_forward,
                 "forward threw on " << (native.threw_forward ? "native" : "scalar") << " only");
  MOE_FUZZ_CHECK(native.threw_forward == (!x_finite && s.T > 0), "forward threw = " << native.threw_forward << " with x finite = " << x_finite);
  if (native.threw_forward) return;
  MOE_FUZZ_CHECK(native.threw_backward == scalar.threw_backward,
                 "backward threw on " << (native.threw_backward ? "native" : "scalar") << " only");
  MOE_FUZZ_CHECK(native.threw_backward == (!dy_finite && s.T > 0), "backward threw = " << native.threw_backward << " with dy finite = " << dy_finite);
  if (native.threw_backward || s.T == 0) return;

  const Reference ref{s, params, x};
  std::vector<TokenRef> tok(static_cast<std::size_t>(s.T));
  std::vector<bool> skip(static_cast<std::size_t>(s.T), false);
  bool any_skip = false;
  for (Index t = 0; t < s.T; ++t) {
    TokenRef& r = tok[static_cast<std::size_t>(t)];
    ref.route(t, r);
    bool near_tie = false;
    const std::vector<Index> want = ref.top_set(r, near_tie);
    const auto set_n = sorted_set(native.ids, t, s.k), set_s = sorted_set(scalar.ids, t, s.k);
    if (!near_tie) {
      MOE_FUZZ_CHECK(set_n == want && set_s == want, "token " << t << ": the chosen experts differ from the reference's "
                                                              "top-k away from a near-tie (native " << set_n[0] << "..., scalar "
                                                              << set_s[0] << "..., reference " << want[0] << "...)");
    }
    if (set_n != set_s) {
      skip[static_cast<std::size_t>(t)] = any_skip = true;
      continue;
    }
    r.chosen.assign(native.ids.begin() + t * s.k, native.ids.begin() + (t + 1) * s.k);
    ref.forward<ActModel>(t, r);
    // Weights, matched by expert (the slot order may differ inside a near-tie).
    for (Index j = 0; j < s.k; ++j) {
      const auto i = static_cast<std::size_t>(t * s.k + j);
      const Index e = native.ids[i];
      const auto js = std::find(scalar.ids.begin() + t * s.k, scalar.ids.begin() + (t + 1) * s.k, e) - scalar.ids.begin();
      check_close("weight", t, e, native.w[i], scalar.w[static_cast<std::size_t>(js)], r.w[static_cast<std::size_t>(j)]);
    }
    for (Index o = 0; o < s.d; ++o) check_close("y", t, o, native.y(t, o), scalar.y(t, o), r.y[static_cast<std::size_t>(o)]);
  }
  // A token whose choice differs between the archs (a near-tie) has no common reference: the input gradient of
  // the other tokens does not depend on it, the parameter gradients do, so with such tokens only dx of the
  // others is compared.
  std::vector<TokenRef> kept = tok;
  Shape s_kept = s;
  Matrix x_kept = x, dy_kept = dy;
  if (any_skip) {
    std::vector<Index> idx;
    for (Index t = 0; t < s.T; ++t)
      if (!skip[static_cast<std::size_t>(t)]) idx.push_back(t);
    s_kept.T = static_cast<Index>(idx.size());
    kept.clear();
    x_kept.resize(s_kept.T, s.d);
    dy_kept.resize(s_kept.T, s.d);
    for (std::size_t i = 0; i < idx.size(); ++i) {
      kept.push_back(tok[static_cast<std::size_t>(idx[i])]);
      x_kept.row(static_cast<Index>(i)) = x.row(idx[i]);
      dy_kept.row(static_cast<Index>(i)) = dy.row(idx[i]);
    }
    const Reference ref_kept{s_kept, params, x_kept};
    const Grads g = reference_backward<ActModel>(ref_kept, kept, dy_kept);
    for (std::size_t i = 0; i < idx.size(); ++i)
      for (Index o = 0; o < s.d; ++o)
        check_close("dx", idx[i], o, native.dx(idx[i], o), scalar.dx(idx[i], o), g.dx[i][static_cast<std::size_t>(o)]);
    return;
  }
  const Grads g = reference_backward<ActModel>(ref, kept, dy);
  for (Index t = 0; t < s.T; ++t)
    for (Index o = 0; o < s.d; ++o)
      check_close("dx", t, o, native.dx(t, o), scalar.dx(t, o), g.dx[static_cast<std::size_t>(t)][static_cast<std::size_t>(o)]);
  for (const auto& [name, m] : native.grads) {
    const Matrix& ms = scalar.grads.at(name);
    const auto& rg = g.param.at(name);
    MOE_FUZZ_CHECK(static_cast<Index>(rg.size()) == m.rows(), "gradient " << name << " has " << m.rows() << " rows");
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j)
        check_close(name.c_str(), i, j, m(i, j), ms(i, j), rg[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)]);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  Shape s;
  s.T = in.below(k_max_tokens + 1);
  s.E = 1 + in.below(k_max_experts);
  s.k = 1 + in.below(std::min(s.E, k_max_top_k));
  s.d = 1 + in.below(k_max_width);
  s.d_ff = 1 + in.below(k_max_width);
  const std::uint8_t flags = in.byte();
  s.gated = (flags & 1) != 0;
  s.relu = (flags & 2) != 0;
  s.bias = (flags & 4) != 0;
  s.options.renormalize = (flags & 8) != 0;
  s.options.softmax_after_top_k = (flags & 16) != 0;
  static constexpr double k_temperature[] = {1.0, 1.0, 0.5, 2.0};
  s.options.temperature = in.pick(k_temperature);

  // Parameters, in the layer's visit order and shapes.
  Params params;
  params["router.gate"] = Matrix(s.E, s.d);
  params["bank0.w1"] = Matrix(s.E * s.d_ff, s.d);
  if (s.gated) params["bank0.w3"] = Matrix(s.E * s.d_ff, s.d);
  params["bank0.w2"] = Matrix(s.E * s.d, s.d_ff);
  if (s.bias) {
    params["bank0.b1"] = Matrix(s.E, s.d_ff);
    if (s.gated) params["bank0.b3"] = Matrix(s.E, s.d_ff);
    params["bank0.b2"] = Matrix(s.E, s.d);
  }
  for (auto& [name, m] : params) fill_moderate(in, m);
  Matrix x(s.T, s.d), dy(s.T, s.d);
  fill_input(in, x);
  fill_input(in, dy);

  if (s.relu) {
    if (s.gated) run_case<kernels::ReLU, true>(s, params, x, dy);
    else run_case<kernels::ReLU, false>(s, params, x, dy);
  } else {
    if (s.gated) run_case<kernels::SiLU, true>(s, params, x, dy);
    else run_case<kernels::SiLU, false>(s, params, x, dy);
  }
  return 0;
}
