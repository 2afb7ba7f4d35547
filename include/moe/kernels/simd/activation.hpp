#pragma once
/// @file kernels/simd/activation.hpp
/// @brief Element-wise activations (ReLU, SiLU, GELU, GELU-tanh) as functors that work on scalars and
/// on xsimd batches, and the kernels that apply them: plain (out = act(in)) and gated
/// (out = act(gate) * up: SwiGLU with SiLU, GeGLU with GELU).
///
/// Non-finite inputs follow IEEE arithmetic through the formulas below: NaN stays NaN, +inf maps to
/// +inf (ReLU, SiLU, GELU, GELUTanh), and -inf maps to 0 for ReLU and to NaN for the three smooth
/// activations (-inf * 0). Large finite |x| never gives NaN.

#include <cassert>
#include <cmath>
#include <cstddef>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// The element type of V: V itself for float/double, T for xsimd::batch<T, A>.
template <class V>
struct activation_scalar {
  using type = V;
};
template <class T, class A>
struct activation_scalar<xsimd::batch<T, A>> {
  using type = T;
};
template <class V>
using activation_scalar_t = typename activation_scalar<V>::type;

/// select() for scalars: xsimd 8.1 only provides the batch overload.
template <class T>
  requires std::is_floating_point_v<T>
T activation_select(bool cond, T if_true, T if_false) {
  return cond ? if_true : if_false;
}
template <class T, class A>
xsimd::batch<T, A> activation_select(const xsimd::batch_bool<T, A>& cond, const xsimd::batch<T, A>& if_true,
                                     const xsimd::batch<T, A>& if_false) {
  return xsimd::select(cond, if_true, if_false);
}

}  // namespace detail

/// max(x, 0), with NaN passed through (x < 0 is false for NaN) and -0 kept.
struct ReLU {
  static constexpr const char* name() { return "relu"; }
  /// d/dx, scalar (the backward pass): 1 for x > 0, else 0 (the kink takes the left derivative).
  template <class T>
  static T derivative(T x) {
    return x > T(0) ? T(1) : T(0);
  }
  /// @tparam V float, double or xsimd::batch of them
  template <class V>
  static V apply(const V& x) {
    using S = detail::activation_scalar_t<V>;
    return detail::activation_select(x < V(S(0)), V(S(0)), x);
  }
};

/// x * sigmoid(x), computed as x / (1 + exp(-x)): for x << 0 exp(-x) overflows to +inf and the
/// result is -0 (not -inf * 0 = NaN); for x >> 0 exp(-x) underflows to 0 and the result is x.
struct SiLU {
  static constexpr const char* name() { return "silu"; }
  /// d/dx = s (1 + x (1 - s)) with s = sigmoid(x), scalar (the backward pass).
  template <class T>
  static T derivative(T x) {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
  /// @tparam V float, double or xsimd::batch of them
  template <class V>
  static V apply(const V& x) {
    using S = detail::activation_scalar_t<V>;
    return x / (V(S(1)) + xsimd::exp(-x));
  }
};

/// Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), computed as 0.5 x erfc(-x / sqrt 2):
/// 1 + erf(z) cancels catastrophically for z << 0 (all digits lost below x ~ -4 in f32), erfc does not.
struct GELU {
  static constexpr const char* name() { return "gelu"; }
  /// d/dx = Phi(x) + x phi(x), scalar (the backward pass).
  template <class T>
  static T derivative(T x) {
    constexpr T inv_sqrt_2pi = T(0.39894228040143267794);
    return T(0.5) * std::erfc(-x * T(0.70710678118654752440)) + x * inv_sqrt_2pi * std::exp(T(-0.5) * x * x);
  }
  /// @tparam V float, double or xsimd::batch of them
  template <class V>
  static V apply(const V& x) {
    using S = detail::activation_scalar_t<V>;
    constexpr S minus_inv_sqrt2 = S(-0.70710678118654752440);
    return V(S(0.5)) * x * xsimd::erfc(x * V(minus_inv_sqrt2));
  }
};

/// GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as
/// x / (1 + exp(-2 sqrt(2/pi) x (1 + 0.044715 x^2))): the same function, because 1 + tanh(u) =
/// 2 / (1 + exp(-2u)), without the cancellation of 1 + tanh(u) for u << 0. Overflow of x^2 or of the
/// exp gives x or -0, never NaN, for finite x.
struct GELUTanh {
  static constexpr const char* name() { return "gelu_tanh"; }
  /// d/dx of x s(2u), s = sigmoid, u = sqrt(2/pi) (x + 0.044715 x^3): s + x s (1 - s) 2u', scalar.
  template <class T>
  static T derivative(T x) {
    const T du2 = T(1.5957691216057308) * (T(1) + T(3 * 0.044715) * x * x);  // d(2u)/dx
    const T s = T(1) / (T(1) + std::exp(-T(1.5957691216057308) * x * (T(1) + T(0.044715) * x * x)));
    return s + x * s * (T(1) - s) * du2;
  }
  /// @tparam V float, double or xsimd::batch of them
  template <class V>
  static V apply(const V& x) {
    using S = detail::activation_scalar_t<V>;
    constexpr S c1 = S(-1.5957691216057308);  // -2 sqrt(2/pi)
    constexpr S c3 = S(-0.07135481627260025);  // -2 sqrt(2/pi) * 0.044715
    return x / (V(S(1)) + xsimd::exp(x * (V(c1) + V(c3) * (x * x))));
  }
};

/// out[i] = Act::apply(in[i]).
/// @tparam Act ReLU, SiLU, GELU, GELUTanh (or any functor with a templated static apply)
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param in n inputs; may equal `out`
/// @param out n outputs
/// @param n length
template <class Act, class Arch, class T>
void activate(Arch, const T* in, T* out, Index n) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::activate: T must be float or double");
  assert(n >= 0);
  detail::elementwise<T, Arch>(n, [&]<class V>(V, Index i) { detail::store(Act::apply(detail::load<V>(in + i)), out + i); });
}

/// out[i] = Act::apply(gate[i]) * up[i]: SwiGLU with SiLU, GeGLU with GELU.
/// @tparam Act ReLU, SiLU, GELU, GELUTanh (or any functor with a templated static apply)
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param gate n gate pre-activations; may equal `out`
/// @param up n linear values; may equal `out`
/// @param out n outputs
/// @param n length
template <class Act, class Arch, class T>
void gated_activate(Arch, const T* gate, const T* up, T* out, Index n) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::gated_activate: T must be float or double");
  assert(n >= 0);
  detail::elementwise<T, Arch>(n, [&]<class V>(V, Index i) {
    detail::store(Act::apply(detail::load<V>(gate + i)) * detail::load<V>(up + i), out + i);
  });
}

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
