#pragma once
/// @file routers.hpp
/// @brief Module header: every router policy and router wrapper (namespace moe::routers, docs/routers.md).
/// Routers depend on base headers, the contracts (concepts.hpp, routing_plan.hpp), kernels and losses only.

#include "routers/capacity.hpp"
#include "routers/dense_to_sparse.hpp"
#include "routers/expert_choice.hpp"
#include "routers/gating_residual.hpp"
#include "routers/linear_gate.hpp"
#include "routers/noise.hpp"
#include "routers/null_experts.hpp"
#include "routers/scores.hpp"
#include "routers/sequence_level.hpp"
#include "routers/token_chunks.hpp"
#include "routers/top_k_router.hpp"
#include "routers/top_k_softmax.hpp"
#include "routers/with_losses.hpp"
#include "routers/wrapper.hpp"
