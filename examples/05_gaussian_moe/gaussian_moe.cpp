/// \file gaussian_moe.cpp
/// \brief Reproduces the convergence rates of "Statistical Perspective of Top-K Sparse Softmax Gating Mixture
/// of Experts" (arXiv 2309.13850; PAPERS.md D.5): the maximum-likelihood estimate of the conditional density
/// of a top-K sparse softmax gating Gaussian MoE converges at the parametric rate n^{-1/2}; its parameters do
/// too when the number of experts is exact (k = k*), and more slowly when it is over-specified (k > k*).
///
/// Data: x ~ U[-1, 1]; the true model has k* = 2 Gaussian experts N(a_i x + b_i, σ_i²) under a top-1 softmax
/// gate with affine logits (so each x belongs to one expert, split at the boundary x = -0.25). For each
/// n in {1k, 2k, ..., 64k} and several replicate datasets, two fits:
///   exact (k = 2, top-1): every x has a single expert, so EM's E-step is trivial and the MLE is computed
///     exactly: for each boundary between consecutive sorted x, both experts are closed-form least squares.
///   over-specified (k = 3, top-2): EM from the exact fit with one expert split in two (both splits tried, the
///     higher likelihood kept); E-step exact, expert M-step weighted least squares, gate M-step one
///     gradient-ascent step on the log-likelihood per iteration (backtracking: every accepted step raises it).
///     A top-2 gate reproduces the true top-1 gate only in the limit of infinitely steep logits (the partner
///     of the unsplit expert must get weight 0), so the fit starts with steep gate lines (slope 10 n).
/// The gate uses the library's kernels (moe::kernels::top_k, moe::kernels::softmax_row) on each x's logits.
/// Metrics: the Hellinger distance between the fitted and the true conditional densities, averaged over x
/// (adaptive Simpson in x between the gates' switch points, trapezoid in y), and the Voronoi loss of the
/// parameters (first powers, see voronoi_loss). Slopes: least squares of log(geometric mean over replicates)
/// against log n.
///
/// Usage: gaussian_moe [--quick] [--seed=S] [--out=DIR]
///   --quick  n in {1k, 2k, 4k}, 2 replicates, at most 30 EM iterations (the ctest smoke test); the full run
///            has 12 replicates per n and at most 100 EM iterations
/// Writes DIR/gaussian_moe_error.csv (n,setting,replicate,density_error,parameter_error); scripts/plot.py DIR
/// plots it. Ends with
///   RESULT gaussian_moe PASS|FAIL exact_density_slope=.. over_density_slope=.. exact_param_slope=..
///                                 over_param_slope=..
/// PASS when both density slopes are in [-0.6, -0.4], the exact parameter slope is in [-0.6, -0.4] and the
/// over-specified parameter slope is > -0.35.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <vector>

#include <moe/moe.hpp>

#include "common/cli.hpp"

namespace {

using Arch = moe::kernels::default_arch;
constexpr moe::Index k_max_experts = 3;
// Per-x gate buffers span at least one SIMD register: GCC then sees the kernels' vector loads in bounds
// (they never run for rows shorter than a register, but -Warray-bounds cannot tell).
constexpr std::size_t k_buffer = std::max<std::size_t>(k_max_experts, xsimd::batch<double, Arch>::size);
constexpr double k_pi = 3.141592653589793;

struct Expert {
  double a, b, sigma;  // y | x ~ N(a x + b, sigma²)
};

// Top-K sparse softmax gating Gaussian MoE on scalar x: expert i has the gate logit w_i x + c_i.
struct Model {
  moe::Index top_k = 1;
  std::vector<double> w, c;
  std::vector<Expert> experts;
  moe::Index k() const { return static_cast<moe::Index>(experts.size()); }
};

// The gate at x: ids of the top_k logits and their softmax weights.
void gate(const Model& m, double x, moe::Index* ids, double* weights) {
  std::array<double, k_buffer> logits{};
  for (moe::Index i = 0; i < m.k(); ++i) logits[std::size_t(i)] = m.w[std::size_t(i)] * x + m.c[std::size_t(i)];
  moe::kernels::top_k(Arch{}, logits.data(), m.k(), m.top_k, ids);
  for (moe::Index s = 0; s < m.top_k; ++s) weights[s] = logits[std::size_t(ids[s])];
  moe::kernels::softmax_row(Arch{}, weights, weights, m.top_k);
}

double normal_pdf(double y, double mean, double sigma) {
  const double z = (y - mean) / sigma;
  return std::exp(-0.5 * z * z) / (sigma * std::sqrt(2 * k_pi));
}

double density(const Model& m, double x, double y) {
  std::array<moe::Index, k_buffer> ids{};
  std::array<double, k_buffer> g{};
  gate(m, x, ids.data(), g.data());
  double p = 0;
  for (moe::Index s = 0; s < m.top_k; ++s) {
    const Expert& e = m.experts[std::size_t(ids[std::size_t(s)])];
    p += g[std::size_t(s)] * normal_pdf(y, e.a * x + e.b, e.sigma);
  }
  return p;
}

// The truth: expert 0 for x < -0.25, expert 1 above (logits -4x - 1 and 0).
Model true_model() { return {1, {-4.0, 0.0}, {-1.0, 0.0}, {{2.0, 0.5, 0.4}, {-1.5, -1.0, 0.3}}}; }

struct Data {
  std::vector<double> x, y;
};

Data sample(const Model& m, moe::Index n, moe::Rng& rng) {
  Data d{std::vector<double>(std::size_t(n)), std::vector<double>(std::size_t(n))};
  std::array<moe::Index, k_buffer> ids{};
  std::array<double, k_buffer> g{};
  for (std::size_t t = 0; t < d.x.size(); ++t) {
    d.x[t] = rng.uniform(-1, 1);
    gate(m, d.x[t], ids.data(), g.data());  // top-1 in the truth: weight 1
    const Expert& e = m.experts[std::size_t(ids[0])];
    d.y[t] = e.a * d.x[t] + e.b + e.sigma * rng.normal();
  }
  return d;
}

// Weighted sums for a least-squares line y ≈ a x + b.
struct Sums {
  double n = 0, x = 0, y = 0, xx = 0, xy = 0, yy = 0;
  void add(double wt, double xi, double yi) {
    n += wt, x += wt * xi, y += wt * yi, xx += wt * xi * xi, xy += wt * xi * yi, yy += wt * yi * yi;
  }
  Sums minus(const Sums& o) const { return {n - o.n, x - o.x, y - o.y, xx - o.xx, xy - o.xy, yy - o.yy}; }
  Expert fit() const {
    const double a = (n * xy - x * y) / (n * xx - x * x), b = (y - a * x) / n;
    const double rss = yy - 2 * a * xy - 2 * b * y + a * a * xx + 2 * a * b * x + b * b * n;
    return {a, b, std::sqrt(std::max(rss / n, 1e-12))};
  }
  double max_log_likelihood() const {
    const double sigma = fit().sigma;
    return -0.5 * n * (std::log(2 * k_pi * sigma * sigma) + 1);
  }
};

// Exact MLE of the k = 2, top-1 model: the best boundary between sorted x, experts by least squares.
Model fit_exact(const Data& d) {
  const std::size_t n = d.x.size();
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](std::size_t i, std::size_t j) { return d.x[i] < d.x[j]; });
  std::vector<Sums> prefix(n + 1);
  for (std::size_t i = 0; i < n; ++i) {
    prefix[i + 1] = prefix[i];
    prefix[i + 1].add(1, d.x[order[i]], d.y[order[i]]);
  }
  std::size_t best = 3;
  double best_ll = -INFINITY;
  for (std::size_t m = 3; m + 3 <= n; ++m) {  // at least 3 points a side: a line and a positive variance
    const double ll = prefix[m].max_log_likelihood() + prefix[n].minus(prefix[m]).max_log_likelihood();
    if (ll > best_ll) best_ll = ll, best = m;
  }
  const double boundary = 0.5 * (d.x[order[best - 1]] + d.x[order[best]]);
  // Top-1 only reads the sign of the logit difference: any positive scale gives the same model.
  return {1, {-1.0, 0.0}, {boundary, 0.0}, {prefix[best].fit(), prefix[n].minus(prefix[best]).fit()}};
}

// Log-likelihood; with `resp`/`grad` also the responsibilities (n, k) and d loglik / d(w_i, c_i) (2k).
double log_likelihood(const Model& m, const Data& d, std::vector<double>* resp, std::vector<double>* grad) {
  const moe::Index k = m.k();
  if (grad != nullptr) grad->assign(std::size_t(2 * k), 0.0);
  std::array<moe::Index, k_buffer> ids{};
  std::array<double, k_buffer> g{}, joint{};
  double ll = 0;
  for (std::size_t t = 0; t < d.x.size(); ++t) {
    gate(m, d.x[t], ids.data(), g.data());
    double p = 0;
    for (moe::Index s = 0; s < m.top_k; ++s) {
      const Expert& e = m.experts[std::size_t(ids[std::size_t(s)])];
      joint[std::size_t(s)] = g[std::size_t(s)] * normal_pdf(d.y[t], e.a * d.x[t] + e.b, e.sigma);
      p += joint[std::size_t(s)];
    }
    p = std::max(p, 1e-300);
    ll += std::log(p);
    if (resp != nullptr) {
      double* r = resp->data() + t * std::size_t(k);
      std::fill_n(r, k, 0.0);
      for (moe::Index s = 0; s < m.top_k; ++s) r[ids[std::size_t(s)]] = joint[std::size_t(s)] / p;
    }
    if (grad != nullptr)  // d log p / d logit_i = r_i - g_i on the chosen experts (the choice is locally fixed)
      for (moe::Index s = 0; s < m.top_k; ++s) {
        const auto i = std::size_t(ids[std::size_t(s)]);
        const double dl = joint[std::size_t(s)] / p - g[std::size_t(s)];
        (*grad)[2 * i] += dl * d.x[t];
        (*grad)[2 * i + 1] += dl;
      }
  }
  return ll;
}

// EM for the top-K model from `m`; returns the final log-likelihood.
double fit_em(Model& m, const Data& d, int max_iterations) {
  const moe::Index k = m.k();
  const double n = double(d.x.size());
  std::vector<double> resp(d.x.size() * std::size_t(k)), grad;
  double ll = log_likelihood(m, d, &resp, nullptr), step = 1.0;
  for (int it = 0; it < max_iterations; ++it) {
    std::array<Sums, k_max_experts> sums{};  // expert M-step: weighted least squares
    for (std::size_t t = 0; t < d.x.size(); ++t)
      for (moe::Index i = 0; i < k; ++i) sums[std::size_t(i)].add(resp[t * std::size_t(k) + std::size_t(i)], d.x[t], d.y[t]);
    for (moe::Index i = 0; i < k; ++i)
      if (sums[std::size_t(i)].n > 3) m.experts[std::size_t(i)] = sums[std::size_t(i)].fit();
    // Gate M-step: a gradient-ascent step on the mean log-likelihood, shrunk until it raises it; the last
    // expert's logit stays 0 (a common shift of every logit changes neither the choice nor the weights).
    const double base = log_likelihood(m, d, nullptr, &grad);
    for (int tries = 0; tries < 20; ++tries) {
      Model next = m;
      for (moe::Index i = 0; i + 1 < k; ++i) {
        next.w[std::size_t(i)] += step * grad[std::size_t(2 * i)] / n;
        next.c[std::size_t(i)] += step * grad[std::size_t(2 * i + 1)] / n;
      }
      if (log_likelihood(next, d, nullptr, nullptr) > base) {
        m = next;
        step *= 2;
        break;
      }
      step /= 4;
    }
    const double next_ll = log_likelihood(m, d, &resp, nullptr);  // E-step
    const bool converged = next_ll - ll < 1e-10 * n;
    ll = next_ll;
    if (converged) break;
  }
  return ll;
}

// Over-specified fit (k = 3, top-2): from the exact fit, one expert split in two (a nudged copy) sharing its
// gate line; both choices of the split expert are tried and the higher likelihood kept.
Model fit_over(const Data& d, const Model& exact, int max_iterations) {
  Model best;
  double best_ll = -INFINITY;
  // Steep enough to reproduce the hard top-1 boundary at the resolution of n points; EM may soften it.
  const double slope = 10.0 * double(d.x.size()), boundary = exact.c[0];
  for (int split = 0; split < 2; ++split) {
    const Expert e = exact.experts[std::size_t(split)], other = exact.experts[std::size_t(1 - split)];
    const double sign = split == 0 ? -1.0 : 1.0;  // the split expert's side of the boundary
    const double delta = 0.05 * e.sigma;
    Model m{2,
            {sign * slope, sign * slope, 0.0},
            {-sign * slope * boundary, -sign * slope * boundary, 0.0},
            {{e.a + delta, e.b - delta, e.sigma}, {e.a - delta, e.b + delta, e.sigma}, other}};
    const double ll = fit_em(m, d, max_iterations);
    if (ll > best_ll) best_ll = ll, best = m;
  }
  return best;
}

// Adaptive Simpson of f on [a, b] to absolute tolerance `tol`.
double simpson(const std::function<double(double)>& f, double a, double b, double fa, double fm, double fb, double tol,
               int depth) {
  const double m = 0.5 * (a + b), lm = 0.5 * (a + m), rm = 0.5 * (m + b);
  const double flm = f(lm), frm = f(rm);
  const double whole = (b - a) / 6 * (fa + 4 * fm + fb);
  const double left = (m - a) / 6 * (fa + 4 * flm + fm), right = (b - m) / 6 * (fm + 4 * frm + fb);
  if (depth <= 0 || std::abs(left + right - whole) <= 15 * tol) return left + right + (left + right - whole) / 15;
  return simpson(f, a, m, fa, flm, fm, tol / 2, depth - 1) + simpson(f, m, b, fm, frm, fb, tol / 2, depth - 1);
}

// ∫_{-1}^{1} f(x) dx / 2, split at the points where either gate changes its choice (its logits cross).
double average_over_x(const std::function<double(double)>& f, const Model& fitted, const Model& truth) {
  std::vector<double> cuts = {-1.0, 1.0};
  for (const Model* m : {&fitted, &truth})
    for (moe::Index i = 0; i < m->k(); ++i)
      for (moe::Index j = i + 1; j < m->k(); ++j) {
        const double dw = m->w[std::size_t(i)] - m->w[std::size_t(j)];
        const double x = dw == 0 ? 2.0 : -(m->c[std::size_t(i)] - m->c[std::size_t(j)]) / dw;
        if (x > -1 && x < 1) cuts.push_back(x);
      }
  std::sort(cuts.begin(), cuts.end());
  double total = 0;
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    // Inside a piece, not on a cut: the choice is constant there (up to the piece's own end points).
    const double a = cuts[i] + 1e-12, b = cuts[i + 1] - 1e-12;
    if (b <= a) continue;
    total += simpson(f, a, b, f(a), f(0.5 * (a + b)), f(b), 1e-11, 40);
  }
  return total / 2;
}

// Hellinger distance between the conditional densities, averaged over x: sqrt(E_x ½∫(√p - √p*)² dy).
double hellinger(const Model& fitted, const Model& truth) {
  const auto squared_at = [&](double x) {
    const double lo = -6.0, hi = 6.0;  // the truth's means stay in [-2.5, 2.5], its σ <= 0.4
    const int n_y = 1200;
    const double dy = (hi - lo) / n_y;
    double s = 0;
    for (int i = 0; i <= n_y; ++i) {
      const double y = lo + i * dy;
      const double diff = std::sqrt(density(fitted, x, y)) - std::sqrt(density(truth, x, y));
      s += (i == 0 || i == n_y ? 0.5 : 1.0) * diff * diff;
    }
    return 0.5 * s * dy;
  };
  return std::sqrt(average_over_x(squared_at, fitted, truth));
}

// Mean gate weight of each expert over x ~ U[-1, 1] (its mixing mass).
std::vector<double> masses(const Model& m, const Model& truth) {
  std::vector<double> out;
  for (moe::Index i = 0; i < m.k(); ++i)
    out.push_back(average_over_x(
        [&](double x) {
          std::array<moe::Index, k_buffer> ids{};
          std::array<double, k_buffer> g{};
          gate(m, x, ids.data(), g.data());
          for (moe::Index s = 0; s < m.top_k; ++s)
            if (ids[std::size_t(s)] == i) return g[std::size_t(s)];
          return 0.0;
        },
        m, truth));
  return out;
}

// Voronoi loss (first powers): each fitted expert joins the cell of the nearest true expert (in (a, b, σ));
// per cell, |mass of its fitted experts - true mass| plus the mass-weighted |Δa| + |Δb| + |Δσ| of each. The
// gate's slopes are left out: a top-K gate is identified only through where it switches (the masses), its
// logits' scale is free. With one fitted expert per cell this is of the order of the parameter error; with
// two in a cell the first powers expose their slower convergence.
double voronoi_loss(const Model& fitted, const Model& truth) {
  const auto pi = masses(fitted, truth), pi_true = masses(truth, truth);
  std::vector<double> cell_mass(pi_true.size(), 0.0);
  double loss = 0;
  for (std::size_t i = 0; i < fitted.experts.size(); ++i) {
    const Expert& e = fitted.experts[i];
    std::size_t cell = 0;
    double nearest = INFINITY;
    for (std::size_t j = 0; j < truth.experts.size(); ++j) {
      const Expert& t = truth.experts[j];
      const double dist = std::hypot(e.a - t.a, e.b - t.b, e.sigma - t.sigma);
      if (dist < nearest) nearest = dist, cell = j;
    }
    const Expert& t = truth.experts[cell];
    cell_mass[cell] += pi[i];
    loss += pi[i] * (std::abs(e.a - t.a) + std::abs(e.b - t.b) + std::abs(e.sigma - t.sigma));
  }
  for (std::size_t j = 0; j < cell_mass.size(); ++j) loss += std::abs(cell_mass[j] - pi_true[j]);
  return loss;
}

// Least-squares slope of log(y) against log(x).
double log_log_slope(const std::vector<double>& x, const std::vector<double>& y) {
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < x.size(); ++i) mx += std::log(x[i]), my += std::log(y[i]);
  mx /= double(x.size()), my /= double(y.size());
  double sxy = 0, sxx = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxy += (std::log(x[i]) - mx) * (std::log(y[i]) - my);
    sxx += (std::log(x[i]) - mx) * (std::log(x[i]) - mx);
  }
  return sxy / sxx;
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "gaussian_moe [--quick] [--seed=S] [--out=DIR]");
  const int n_sizes = cli.quick ? 3 : 7, replicates = cli.quick ? 2 : 12, max_iterations = cli.quick ? 30 : 100;
  const Model truth = true_model();
  auto csv = moe::examples::open_csv(cli, "gaussian_moe_error.csv");
  csv << "n,setting,replicate,density_error,parameter_error\n";

  // Per setting (0 exact, 1 over-specified): the geometric mean over replicates of each error, per n.
  std::vector<double> sizes;
  std::array<std::vector<double>, 2> density_error, parameter_error;
  moe::ProgressLine progress("gaussian_moe fits", long(n_sizes) * replicates);
  long done = 0;
  for (int s = 0; s < n_sizes; ++s) {
    const moe::Index n = moe::Index(1000) << s;
    sizes.push_back(double(n));
    // (replicate, setting) errors; replicates run in parallel, each from its own seed.
    std::vector<std::array<double, 2>> h(static_cast<std::size_t>(replicates)), v(h.size());
    MOE_OMP(omp parallel for schedule(dynamic))
    for (int r = 0; r < replicates; ++r) {
      moe::Rng rng(cli.seed * 1000003 + std::uint64_t(s) * 1009 + std::uint64_t(r));
      const Data d = sample(truth, n, rng);
      const Model exact = fit_exact(d);
      const std::array<Model, 2> fits = {exact, fit_over(d, exact, max_iterations)};
      for (std::size_t setting = 0; setting < 2; ++setting) {
        h[std::size_t(r)][setting] = hellinger(fits[setting], truth);
        v[std::size_t(r)][setting] = voronoi_loss(fits[setting], truth);
      }
      MOE_OMP(omp critical)
      progress.update(++done, {.tokens = n});
    }
    for (std::size_t setting = 0; setting < 2; ++setting) {
      double log_h = 0, log_v = 0;
      for (std::size_t r = 0; r < h.size(); ++r) {
        log_h += std::log(h[r][setting]) / replicates;
        log_v += std::log(v[r][setting]) / replicates;
        csv << n << ',' << (setting == 0 ? "exact" : "over_specified") << ',' << r << ',' << h[r][setting] << ','
            << v[r][setting] << '\n';
      }
      density_error[setting].push_back(std::exp(log_h));
      parameter_error[setting].push_back(std::exp(log_v));
    }
  }
  progress.finish();

  std::printf("%8s  %14s %14s  %14s %14s\n", "n", "exact density", "exact param", "over density", "over param");
  for (std::size_t i = 0; i < sizes.size(); ++i)
    std::printf("%8.0f  %14.5f %14.5f  %14.5f %14.5f\n", sizes[i], density_error[0][i], parameter_error[0][i],
                density_error[1][i], parameter_error[1][i]);
  const double exact_density = log_log_slope(sizes, density_error[0]), over_density = log_log_slope(sizes, density_error[1]);
  const double exact_param = log_log_slope(sizes, parameter_error[0]), over_param = log_log_slope(sizes, parameter_error[1]);
  std::printf("log-log slopes: density exact %.3f, over-specified %.3f; parameters exact %.3f, over-specified %.3f\n",
              exact_density, over_density, exact_param, over_param);
  std::printf("wrote %s/gaussian_moe_error.csv\n", cli.out.c_str());
  const auto in_band = [](double slope) { return slope >= -0.6 && slope <= -0.4; };
  const bool pass = in_band(exact_density) && in_band(over_density) && in_band(exact_param) && over_param > -0.35;
  moe::examples::report("gaussian_moe", pass,
                        {{"exact_density_slope", exact_density},
                         {"over_density_slope", over_density},
                         {"exact_param_slope", exact_param},
                         {"over_param_slope", over_param}});
  return 0;
}
