#pragma once
/// @file moe.hpp
/// @brief Umbrella header: everything of the moe library but checkpoint I/O (io/checkpoint.hpp) and the
/// test references (reference/, kernels/reference/). The module headers routers.hpp, experts.hpp,
/// losses.hpp and kernels.hpp include one module each.

#include "concepts.hpp"
#include "config.hpp"
#include "dense_layer.hpp"
#include "error.hpp"
#include "experts.hpp"
#include "kernels.hpp"
#include "losses.hpp"
#include "model.hpp"
#include "moe_config.hpp"
#include "moe_layer.hpp"
#include "optim/adamw.hpp"
#include "optim/grad_clip.hpp"
#include "optim/group.hpp"
#include "optim/sgd.hpp"
#include "parameter.hpp"
#include "presets.hpp"
#include "random.hpp"
#include "routers.hpp"
#include "routing_plan.hpp"
#include "routing_stats.hpp"
#include "stack.hpp"
#include "training_loop.hpp"
#include "version.hpp"
#include "workspace.hpp"
