#pragma once
/// @file experts/init.hpp
/// @brief Seeded initialisation policies for expert weights, chosen per bank (and per tensor role where a
/// bank has roles, e.g. LoRA's A and B). Every policy draws from moe::Rng, so a seed gives the same weights
/// with any standard library and any thread count.

#include <limits>
#include <string>
#include <string_view>
#include <variant>

#include "../config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"

namespace moe::experts {

/// nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (also its bias default).
struct UniformFanIn {};

/// N(0, std^2), e.g. std = 0.02 as in GPT-2 / Mixtral's initializer_range.
struct Normal {
  double std = 0.02;  ///< standard deviation
};

/// Every value 0: LoRA's B (so an untrained adapter leaves the base unchanged) and biases.
struct Zeros {};

/// One of the policies above, selectable at run time.
using InitPolicy = std::variant<UniformFanIn, Normal, Zeros>;

/// `policy`, after checking its numbers for T (moe::Error naming `owner` and `field` otherwise): Normal::std
/// finite, >= 0 and at most max(T) / 16 (a draw is within 9 standard deviations, so every value is a finite T).
template <class T>
const InitPolicy& validated_init(const InitPolicy& policy, std::string_view owner, std::string_view field) {
  if (const auto* normal = std::get_if<Normal>(&policy))
    moe::detail::require_in(normal->std, {.lo = 0.0, .hi = static_cast<double>(std::numeric_limits<T>::max()) / 16},
                            owner, std::string(field) + " (Normal).std");
  return policy;
}

/// Fills `p` with `policy`; `fan_in` is the input width of the projection p belongs to.
/// @tparam T scalar type
/// @param rng    the seeded generator (advanced by the number of values drawn; Zeros draws none)
/// @param policy how to fill
/// @param p      the tensor
/// @param fan_in input features of the projection (> 0)
template <class T>
void initialize(Rng& rng, const InitPolicy& policy, Parameter<T>& p, Index fan_in) {
  std::visit(
      [&](const auto& pol) {
        using P = std::decay_t<decltype(pol)>;
        if constexpr (std::is_same_v<P, UniformFanIn>) {
          p.init_uniform(rng, fan_in);
        } else {
          T* v = p.data();
          for (Index i = 0; i < p.rows() * p.cols(); ++i) {
            if constexpr (std::is_same_v<P, Normal>) {
              v[i] = static_cast<T>(pol.std * rng.normal());
            } else {
              v[i] = T(0);
            }
          }
        }
      },
      policy);
}

}  // namespace moe::experts
