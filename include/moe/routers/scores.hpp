#pragma once
/// @file routers/scores.hpp
/// @brief Score functions (softmax, sigmoid, sqrt-softplus) with their derivatives, the renormalisation of the
/// chosen weights (in log space where their scores underflow) with its derivative, and the slot gather/scatter
/// of a backward.

#include <algorithm>
#include <cmath>
#include <limits>

#include "../config.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/softmax.hpp"

namespace moe::routers {

/// How a router turns logits z into scores s (PAPERS.md A.1).
enum class ScoreFunction {
  softmax,       ///< s = softmax(z) over all experts (Switch, Mixtral, Qwen, DeepSeek-V2)
  sigmoid,       ///< s_i = σ(z_i) (DeepSeek-V3)
  sqrt_softplus  ///< s_i = sqrt(softplus(z_i)) (Megatron "sqrtsoftplus")
};

namespace detail {

/// s = score(z) for a row of n logits. NaN logits count as -inf (score 0), for every function.
template <class Arch, class T>
void score_row(Arch, ScoreFunction f, const T* z, T* s, Index n) {
  switch (f) {
    case ScoreFunction::softmax:
      kernels::softmax_row(Arch{}, z, s, n);
      return;
    case ScoreFunction::sigmoid:
      for (Index i = 0; i < n; ++i) s[i] = std::isnan(z[i]) ? T(0) : T(1) / (T(1) + std::exp(-z[i]));
      return;
    case ScoreFunction::sqrt_softplus:
      for (Index i = 0; i < n; ++i) {
        // softplus(z) = max(z, 0) + log1p(exp(-|z|)): no overflow for large |z|.
        const T sp = std::max(z[i], T(0)) + std::log1p(std::exp(-std::abs(z[i])));
        s[i] = std::isnan(z[i]) ? T(0) : std::sqrt(sp);
      }
      return;
  }
}

/// In place: d holds dL/ds on entry and dL/dz on return, given the scores s of the row (n entries).
/// softmax: dz = s (ds - <ds, s>); sigmoid: dz = ds s (1 - s); sqrt-softplus: ds/dz = σ(z) / (2 s) with
/// σ(z) = 1 - exp(-softplus(z)) = -expm1(-s²), so the logits need not be kept.
template <class T>
void score_backward(ScoreFunction f, const T* s, T* d, Index n) {
  switch (f) {
    case ScoreFunction::softmax: {
      T dot = 0;
      for (Index i = 0; i < n; ++i) dot += d[i] * s[i];
      for (Index i = 0; i < n; ++i) d[i] = s[i] * (d[i] - dot);
      return;
    }
    case ScoreFunction::sigmoid:
      for (Index i = 0; i < n; ++i) d[i] *= s[i] * (T(1) - s[i]);
      return;
    case ScoreFunction::sqrt_softplus:
      for (Index i = 0; i < n; ++i)
        d[i] = s[i] > T(0) && std::isfinite(s[i]) ? d[i] * -std::expm1(-s[i] * s[i]) / (T(2) * s[i]) : T(0);
      return;
  }
}

/// Divides the n weights by their sum. A zero sum (no finite logit among them) leaves them at 0 rather than
/// 0/0; an infinite sum (a +inf score) gives the infinite entries equal shares and the others 0.
template <class T>
void normalize(T* w, Index n) {
  T sum = 0;
  for (Index i = 0; i < n; ++i) sum += w[i];
  if (!(sum > T(0))) return;
  if (std::isinf(sum)) {
    Index count = 0;
    for (Index i = 0; i < n; ++i) count += std::isinf(w[i]) ? 1 : 0;
    for (Index i = 0; i < n; ++i) w[i] = std::isinf(w[i]) ? T(1) / static_cast<T>(count) : T(0);
    return;
  }
  for (Index i = 0; i < n; ++i) w[i] /= sum;
}

/// log f(z) up to a constant shared by the row (softmax: z itself, the log-sum-exp cancels in a renormalisation),
/// finite wherever z is, however small f(z) is in T: sigmoid log σ(z) = -softplus(-z); sqrt-softplus
/// ½ log softplus(z), with log softplus(z) = z + log(log1p(e^z) / e^z) for z <= 0. NaN gives -inf (score 0).
template <class T>
T log_score(ScoreFunction f, T z) {
  if (std::isnan(z)) return -std::numeric_limits<T>::infinity();
  switch (f) {
    case ScoreFunction::softmax:
      return z;
    case ScoreFunction::sigmoid:
      return -(std::max(-z, T(0)) + std::log1p(std::exp(-std::abs(z))));
    case ScoreFunction::sqrt_softplus: {
      if (z > T(0)) return T(0.5) * std::log(z + std::log1p(std::exp(-z)));
      const T u = std::exp(z);
      return T(0.5) * (u == T(0) ? z : z + std::log(std::log1p(u) / u));
    }
  }
  return z;
}

/// d log f(z) / dz for log_score(): softmax 1 (the log-sum-exp term sums to 0 over a renormalised row);
/// sigmoid 1 - σ(z) = 1 / (1 + e^z); sqrt-softplus ½ σ(z) / softplus(z), = ½ (u / log1p(u)) / (1 + u) with
/// u = e^z for z <= 0 (½ where u underflows).
template <class T>
T log_score_derivative(ScoreFunction f, T z) {
  switch (f) {
    case ScoreFunction::softmax:
      return T(1);
    case ScoreFunction::sigmoid:
      return T(1) / (T(1) + std::exp(z));
    case ScoreFunction::sqrt_softplus: {
      if (z > T(0)) return T(0.5) / ((T(1) + std::exp(-z)) * (z + std::log1p(std::exp(-z))));
      const T u = std::exp(z);
      return T(0.5) * (u == T(0) ? T(1) : u / std::log1p(u)) / (T(1) + u);
    }
  }
  return T(1);
}

/// Whether renormalize() works in log space for the chosen scores u (k): their sum is below T's normal range,
/// where dividing by it loses the weights (every chosen score 0 although the logits are finite) or their bits.
template <class T>
bool renormalizes_in_log_space(const T* u, Index k) {
  T sum = 0;
  for (Index i = 0; i < k; ++i) sum += u[i];
  return sum < std::numeric_limits<T>::min();
}

/// Renormalises the k chosen scores u in place to sum 1: u / Σu (normalize()), or, where that sum underflows
/// (renormalizes_in_log_space), softmax_i(log f(z_i)) from the chosen logits z (k, after the temperature; -inf
/// for a slot that holds no expert) — the same weights without the underflow. Weights stay 0 only for a row
/// without a finite chosen logit.
template <class T>
void renormalize(ScoreFunction f, const T* z, T* u, Index k) {
  if (!renormalizes_in_log_space(u, k)) {
    normalize(u, k);
    return;
  }
  for (Index i = 0; i < k; ++i) u[i] = log_score(f, z[i]);
  kernels::softmax_row(kernels::scalar{}, u, u, k);
}

/// Backward of renormalize() in log space (renormalizes_in_log_space(u) holds): w = softmax(ℓ) with
/// ℓ_i = log f(z_i), so dL/dz_i = w_i (g_i - <g, w>) · dℓ_i/dz_i. `u` holds the chosen scores on entry and w on
/// return; `d` holds dL/dw on entry and dL/dz (the chosen logits) on return.
template <class T>
void renormalize_log_backward(ScoreFunction f, const T* z, T* u, T* d, Index k) {
  renormalize(f, z, u, k);
  T dot = 0;
  for (Index i = 0; i < k; ++i) dot += d[i] * u[i];
  for (Index i = 0; i < k; ++i) d[i] = u[i] > T(0) ? u[i] * (d[i] - dot) * log_score_derivative(f, z[i]) : T(0);
}

/// Backward of normalize(): u = s / Σs, so dL/ds_i = (g_i - <g, u>) / Σs. `s` are the raw (unnormalised)
/// scores, `d` holds dL/du on entry and dL/ds on return. No gradient where the forward set rather than
/// computed the weights (zero or infinite sum).
template <class T>
void normalize_backward(const T* s, T* d, Index n) {
  T sum = 0;
  for (Index i = 0; i < n; ++i) sum += s[i];
  if (!(sum > T(0)) || std::isinf(sum)) {
    std::fill_n(d, n, T(0));
    return;
  }
  // <g, u> from the forward's weights u = s / Σs: with one weight u is exactly 1, so the gradient is
  // exactly 0 (RELIABILITY G5), not a rounding residue.
  T dot = 0;
  for (Index i = 0; i < n; ++i) dot += d[i] * (s[i] / sum);
  for (Index i = 0; i < n; ++i) d[i] = (d[i] - dot) / sum;
}

/// Backward's first step for one token: u_s = s[id_s], the chosen scores, and g_s = scale · dL/dw_s; both 0
/// on a slot with id < 0 (it runs nothing, its weight is constantly 0).
template <class T>
void gather_slots(const T* s, const Index* id, const T* dweights, Index k, T scale, T* u, T* g) {
  for (Index i = 0; i < k; ++i) {
    u[i] = id[i] >= 0 ? s[id[i]] : T(0);
    g[i] = id[i] >= 0 ? dweights[i] * scale : T(0);
  }
}

/// ds (n) = the slots' gradients g scattered to their ids (ids are distinct), 0 elsewhere.
template <class T>
void scatter_slots(const Index* id, const T* g, Index k, T* ds, Index n) {
  std::fill_n(ds, n, T(0));
  for (Index i = 0; i < k; ++i)
    if (id[i] >= 0) ds[id[i]] = g[i];
}

}  // namespace detail
}  // namespace moe::routers
