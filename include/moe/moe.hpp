#pragma once
/// @file moe.hpp
/// @brief Umbrella header: everything of the moe library.

#include "concepts.hpp"
#include "config.hpp"
#include "error.hpp"
#include "experts/ffn.hpp"
#include "experts/zero_computation.hpp"
#include "kernels/arch.hpp"
#include "kernels/simd/activation.hpp"
#include "kernels/simd/matmul.hpp"
#include "kernels/simd/scatter_add.hpp"
#include "kernels/simd/softmax.hpp"
#include "kernels/simd/top_k.hpp"
#include "moe_config.hpp"
#include "moe_layer.hpp"
#include "parameter.hpp"
#include "presets.hpp"
#include "random.hpp"
#include "routers/top_k_softmax.hpp"
#include "routing_plan.hpp"
#include "version.hpp"
#include "workspace.hpp"
