#pragma once
/// @file losses.hpp
/// @brief Module header: every load-balancing loss policy (namespace moe::losses, docs/training.md).
/// Losses depend on base headers only.

#include "losses/adamoe_loss.hpp"
#include "losses/balance_batch.hpp"
#include "losses/global_batch.hpp"
#include "losses/moe_plus_plus_loss.hpp"
#include "losses/sequence_balance.hpp"
#include "losses/switch_loss.hpp"
#include "losses/z_loss.hpp"
