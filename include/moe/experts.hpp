#pragma once
/// @file experts.hpp
/// @brief Module header: every expert bank (namespace moe::experts, docs/experts.md).
/// Banks depend on base headers, the contracts (concepts.hpp, routing_plan.hpp) and kernels only.

#include "experts/ffn.hpp"
#include "experts/gru.hpp"
#include "experts/init.hpp"
#include "experts/lora.hpp"
#include "experts/shared.hpp"
#include "experts/upcycle.hpp"
#include "experts/zero_computation.hpp"
