#pragma once
/// @file routers/token_chunks.hpp
/// @brief The fixed token chunks a router's forward is split into: results do not depend on the thread count.

#include <algorithm>

#include "../config.hpp"
#include "../detail/parallel.hpp"

namespace moe::routers {
namespace detail {

/// Tokens per work item of a router's forward: a split that does not depend on the thread count.
inline constexpr Index k_token_chunk = 16;

/// Chunks of k_token_chunk tokens in n_tokens (the last one may be shorter).
inline Index n_token_chunks(Index n_tokens) { return (n_tokens + k_token_chunk - 1) / k_token_chunk; }

/// Calls f(chunk, t0, t1) for fixed chunks [t0, t1) of k_token_chunk tokens, in parallel when the work
/// (`work_per_token` multiply-adds per token) is worth a parallel region.
template <class F>
void for_each_token_chunk(Index n_tokens, double work_per_token, F&& f) {
  const Index n_chunks = n_token_chunks(n_tokens);
  MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * work_per_token >= moe::detail::k_parallel_min_work))
  for (Index c = 0; c < n_chunks; ++c) f(c, c * k_token_chunk, std::min(n_tokens, (c + 1) * k_token_chunk));
}

}  // namespace detail
}  // namespace moe::routers
