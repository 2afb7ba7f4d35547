#pragma once
/// @file routers/noise.hpp
/// @brief Counter-based noise (jitter, Gumbel): a pure function of (seed, step, token, index), so it does not
/// depend on the thread count or call order and backward can recompute it.

#include <cmath>
#include <cstdint>

#include "../config.hpp"

namespace moe::routers {
namespace detail {

/// splitmix64's finaliser: a bijection of 64-bit words with full avalanche.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/// Uniform in the open interval (0, 1) from the counter (seed, step, token, index): a pure function, so
/// noise does not depend on the thread count or on call order, and backward can recompute it.
inline double counter_uniform(std::uint64_t seed, std::uint64_t step, Index token, Index index) {
  std::uint64_t h = mix64(seed + 0x9E3779B97F4A7C15ULL);
  h = mix64(h ^ step);
  h = mix64(h ^ static_cast<std::uint64_t>(token));
  h = mix64(h ^ static_cast<std::uint64_t>(index));
  return (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;
}

/// Standard Gumbel noise -log(-log(u)) from the counter (finite: u is never 0 or 1).
inline double counter_gumbel(std::uint64_t seed, std::uint64_t step, Index token, Index index) {
  return -std::log(-std::log(counter_uniform(seed, step, token, index)));
}

}  // namespace detail
}  // namespace moe::routers
