#pragma once
/// @file kernels/reference/activation.hpp
/// @brief Plain std:: formulas of the activations: the test oracle for kernels/simd/activation.hpp
/// (instantiate with double).

#include <cmath>

#include "../../config.hpp"

namespace moe::kernels {
// The functors live in kernels/simd/activation.hpp; the oracle only needs their names.
struct ReLU;
struct SiLU;
struct GELU;
struct GELUTanh;
}  // namespace moe::kernels

namespace moe::kernels::reference {

/// max(x, 0); NaN passes through.
template <class T>
T relu(T x) {
  return x < T(0) ? T(0) : x;
}

/// x * sigmoid(x) = x / (1 + exp(-x)).
template <class T>
T silu(T x) {
  return x / (T(1) + std::exp(-x));
}

/// Exact GELU, x * Phi(x) = 0.5 x erfc(-x / sqrt 2) (= 0.5 x (1 + erf(x / sqrt 2)) without its
/// cancellation for x << 0).
template <class T>
T gelu(T x) {
  return T(0.5) * x * std::erfc(-x / std::sqrt(T(2)));
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as
/// x / (1 + exp(-2u)) (the same function; 1 + tanh(u) = 2 / (1 + exp(-2u))).
template <class T>
T gelu_tanh(T x) {
  const T u = std::sqrt(T(2) / T(3.14159265358979323846)) * (x + T(0.044715) * x * x * x);
  return x / (T(1) + std::exp(T(-2) * u));
}

template <class>
inline constexpr bool activation_dependent_false = false;

/// Maps an activation functor type to its reference formula.
template <class Act>
struct activation_formula {
  static_assert(activation_dependent_false<Act>, "moe::kernels::reference: no reference formula for this activation");
};
template <>
struct activation_formula<ReLU> {
  template <class T>
  static T apply(T x) { return relu(x); }
};
template <>
struct activation_formula<SiLU> {
  template <class T>
  static T apply(T x) { return silu(x); }
};
template <>
struct activation_formula<GELU> {
  template <class T>
  static T apply(T x) { return gelu(x); }
};
template <>
struct activation_formula<GELUTanh> {
  template <class T>
  static T apply(T x) { return gelu_tanh(x); }
};

/// out[i] = Act(in[i]) with the std:: formula.
/// @tparam Act moe::kernels::ReLU, SiLU, GELU or GELUTanh
/// @param in n inputs; may equal `out`
/// @param out n outputs
/// @param n length
template <class Act, class T>
void activate(const T* in, T* out, Index n) {
  for (Index i = 0; i < n; ++i) out[i] = activation_formula<Act>::apply(in[i]);
}

/// out[i] = Act(gate[i]) * up[i] with the std:: formula.
/// @tparam Act moe::kernels::ReLU, SiLU, GELU or GELUTanh
/// @param gate, up n inputs each; either may equal `out`
/// @param out n outputs
/// @param n length
template <class Act, class T>
void gated_activate(const T* gate, const T* up, T* out, Index n) {
  for (Index i = 0; i < n; ++i) out[i] = activation_formula<Act>::apply(gate[i]) * up[i];
}

}  // namespace moe::kernels::reference
