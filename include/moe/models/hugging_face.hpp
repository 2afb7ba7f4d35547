#pragma once
/// @file models/hugging_face.hpp
/// @brief The MoE blocks of Hugging Face checkpoints, in and out: a checkpoint folder (config.json and
/// model.safetensors, or shards listed in model.safetensors.index.json) becomes a layer of this library, and a
/// layer is written back under the names transformers reads.
///
/// The architectures are data: one HFArchitecture row each (names, config keys, router preset), in
/// hf_architectures(). Supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 (also -Lite), deepseek_v3
/// and switch_transformers (Switch/GShard-style top-1 with a ReLU FFN). Every MoE block is one of four layer types
/// (presets.hpp): SwiGLUMoEType (routed only), Qwen2MoEType (+ a sigmoid-gated shared expert), DeepSeekMoEType
/// (+ shared experts) and SwitchMoEType. Tested against the PyTorch blocks (scripts/make_hf_fixtures.py).
///
/// What loading checks, before it writes anything: config.json names a supported model_type, has every key the
/// block needs (a missing key is an error, never a silent default) and an activation the block supports; the
/// layer index is a MoE layer of that config; every tensor exists with the shape the config implies and a
/// floating-point dtype (F32, F16, BF16, F64, converted to T); every value is finite. Errors (moe::Error, or
/// io::SafetensorsError naming the file, the tensor and the rule) name the file and the key or tensor.
/// Where transformers and the model's authors disagree, this follows the authors (DeepSeek-V2 with norm_topk_prob:
/// renormalise, then do not scale; transformers ignores the flag; docs/models.md). What it does not reproduce:
/// Switch's expert_capacity (the loaded layer drops no token: wrap the router in
/// routers::CapacityLimited for drops), training-time router jitter and dropout.

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../config.hpp"
#include "../error.hpp"
#include "../io/checkpoint.hpp"
#include "../io/safetensors.hpp"
#include "../moe_config.hpp"
#include "../presets.hpp"

namespace moe::models {

/// Which layers of a model are MoE blocks (the rest are dense MLPs).
enum class SparseLayers {
  all,           ///< every layer (Mixtral, OLMoE)
  qwen,          ///< not in mlp_only_layers and (L + 1) % decoder_sparse_step == 0 (Qwen2/3-MoE)
  deepseek,      ///< L >= first_k_dense_replace and L % moe_layer_freq == 0 (DeepSeek-V2/V3)
  switch_style,  ///< L % encoder_sparse_step == 1, or every layer when the step is 1 (Switch encoder)
};

/// One architecture's Hugging Face layout: tensor names ("{L}" = layer index, "{E}" = expert index), config.json
/// keys and the router preset its keys adjust. An empty name or key: the architecture has no such part.
struct HFArchitecture {
  std::string_view model_type{};      ///< config.json "model_type"
  std::string_view block{};           ///< prefix of layer {L}'s MoE block
  std::string_view gate{};            ///< router weight (n_experts, d_model)
  std::string_view selection_bias{};  ///< selection-only bias (n_experts) (DeepSeek-V3 e_score_correction_bias)
  std::string_view expert{};          ///< prefix of routed expert {E}
  std::array<std::string_view, 3> projections{};  ///< w1 (gate_proj, (d_ff, d)), w3 (up_proj; empty: not gated), w2
  std::string_view shared{};                      ///< prefix of the shared expert (one MLP), or empty
  std::string_view shared_gate{};                 ///< shared-expert gate (1, d_model) (Qwen2-MoE), or empty
  std::string_view d_model_key{};                 ///< token width
  std::string_view d_ff_key{};                    ///< routed expert width
  std::string_view n_experts_key{};               ///< routed experts
  std::string_view top_k_key{};                   ///< experts per token (empty: top-1)
  std::string_view shared_d_ff_key{};             ///< width of the shared MLP, or
  std::string_view n_shared_key{};                ///< the number of shared experts of width d_ff, merged into one MLP
  std::string_view n_layers_key{};                ///< layers of the model
  std::string_view activation_key{};              ///< the experts' activation, which must be `activation`
  std::string_view activation{};
  SparseLayers sparse_layers = SparseLayers::all;
  routers::TopKOptions (*router)() = nullptr;  ///< the preset; the keys below override its fields
  std::string_view renormalize_key{};          ///< norm_topk_prob
  bool scoring_keys = false;  ///< scoring_func, topk_method, n_group, topk_group, routed_scaling_factor (DeepSeek)
  /// DeepSeek-V2 applies routed_scaling_factor only to unnormalised weights (DeepSeek's modeling code).
  bool scale_only_unnormalized = false;
};

/// The supported architectures, one row each.
inline std::span<const HFArchitecture> hf_architectures() {
  using P = std::array<std::string_view, 3>;
  static constexpr P hf_mlp{"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
  namespace presets = routers::presets;
  // clang-format off
  static const HFArchitecture table[] = {
      {.model_type = "mixtral", .block = "model.layers.{L}.block_sparse_moe.", .gate = "gate.weight",
       .expert = "experts.{E}.", .projections = P{"w1.weight", "w3.weight", "w2.weight"},
       .d_model_key = "hidden_size", .d_ff_key = "intermediate_size", .n_experts_key = "num_local_experts",
       .top_k_key = "num_experts_per_tok", .n_layers_key = "num_hidden_layers",
       .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::all, .router = presets::mixtral},
      {.model_type = "qwen2_moe", .block = "model.layers.{L}.mlp.", .gate = "gate.weight",
       .expert = "experts.{E}.", .projections = hf_mlp,
       .shared = "shared_expert.", .shared_gate = "shared_expert_gate.weight",
       .d_model_key = "hidden_size", .d_ff_key = "moe_intermediate_size", .n_experts_key = "num_experts",
       .top_k_key = "num_experts_per_tok", .shared_d_ff_key = "shared_expert_intermediate_size",
       .n_layers_key = "num_hidden_layers", .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::qwen, .router = presets::qwen2_moe, .renormalize_key = "norm_topk_prob"},
      {.model_type = "qwen3_moe", .block = "model.layers.{L}.mlp.", .gate = "gate.weight",
       .expert = "experts.{E}.", .projections = hf_mlp,
       .d_model_key = "hidden_size", .d_ff_key = "moe_intermediate_size", .n_experts_key = "num_experts",
       .top_k_key = "num_experts_per_tok", .n_layers_key = "num_hidden_layers",
       .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::qwen, .router = presets::qwen3_moe, .renormalize_key = "norm_topk_prob"},
      {.model_type = "olmoe", .block = "model.layers.{L}.mlp.", .gate = "gate.weight",
       .expert = "experts.{E}.", .projections = hf_mlp,
       .d_model_key = "hidden_size", .d_ff_key = "intermediate_size", .n_experts_key = "num_experts",
       .top_k_key = "num_experts_per_tok", .n_layers_key = "num_hidden_layers",
       .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::all, .router = presets::olmoe, .renormalize_key = "norm_topk_prob"},
      {.model_type = "deepseek_v2", .block = "model.layers.{L}.mlp.", .gate = "gate.weight",
       .expert = "experts.{E}.", .projections = hf_mlp, .shared = "shared_experts.",
       .d_model_key = "hidden_size", .d_ff_key = "moe_intermediate_size", .n_experts_key = "n_routed_experts",
       .top_k_key = "num_experts_per_tok", .n_shared_key = "n_shared_experts",
       .n_layers_key = "num_hidden_layers", .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::deepseek, .router = presets::deepseek_v2, .renormalize_key = "norm_topk_prob",
       .scoring_keys = true, .scale_only_unnormalized = true},
      {.model_type = "deepseek_v3", .block = "model.layers.{L}.mlp.", .gate = "gate.weight",
       .selection_bias = "gate.e_score_correction_bias",
       .expert = "experts.{E}.", .projections = hf_mlp, .shared = "shared_experts.",
       .d_model_key = "hidden_size", .d_ff_key = "moe_intermediate_size", .n_experts_key = "n_routed_experts",
       .top_k_key = "num_experts_per_tok", .n_shared_key = "n_shared_experts",
       .n_layers_key = "num_hidden_layers", .activation_key = "hidden_act", .activation = "silu",
       .sparse_layers = SparseLayers::deepseek, .router = presets::deepseek_v3, .renormalize_key = "norm_topk_prob",
       .scoring_keys = true},
      {.model_type = "switch_transformers", .block = "encoder.block.{L}.layer.1.mlp.",
       .gate = "router.classifier.weight",
       .expert = "experts.expert_{E}.", .projections = P{"wi.weight", "", "wo.weight"},
       .d_model_key = "d_model", .d_ff_key = "d_ff", .n_experts_key = "num_experts",
       .n_layers_key = "num_layers", .activation_key = "dense_act_fn", .activation = "relu",
       .sparse_layers = SparseLayers::switch_style, .router = presets::switch_transformer},
  };
  // clang-format on
  return table;
}

/// The supported model_types, comma-separated (for error messages and docs).
inline std::string hf_supported_list() {
  std::string s;
  for (const HFArchitecture& a : hf_architectures()) s += (s.empty() ? "" : ", ") + std::string(a.model_type);
  return s;
}

/// The row of `model_type`; throws moe::Error listing the supported ones when there is none.
inline const HFArchitecture& hf_architecture(std::string_view model_type) {
  for (const HFArchitecture& a : hf_architectures())
    if (a.model_type == model_type) return a;
  throw Error("moe::models::hf_architecture: model_type \"" + std::string(model_type) +
              "\" is not supported; supported: " + hf_supported_list());
}

/// A Hugging Face config.json read for its MoE blocks.
struct HFConfig {
  const HFArchitecture* architecture = nullptr;  ///< the row of its model_type
  MoEConfig routed{};                            ///< d_model, d_ff, n_experts, top_k of the routed experts
  Index shared_d_ff = 0;                         ///< width of the shared MLP (0: none)
  routers::TopKOptions router{};                 ///< the preset adjusted by the config's keys
  Index n_layers = 0;                            ///< layers of the model
  nlohmann::json json;                           ///< the whole file
  std::filesystem::path source;                  ///< where it was read

  /// True when layer `layer` (0-based) is a MoE block (SparseLayers).
  bool is_moe_layer(Index layer) const {
    if (layer < 0 || layer >= n_layers) return false;
    switch (architecture->sparse_layers) {
      case SparseLayers::all:
        return true;
      case SparseLayers::qwen: {
        const auto only = json.value("mlp_only_layers", std::vector<Index>{});
        const Index step = json.value("decoder_sparse_step", Index{1});
        return std::find(only.begin(), only.end(), layer) == only.end() && step > 0 && (layer + 1) % step == 0;
      }
      case SparseLayers::deepseek: {
        const Index first = json.value("first_k_dense_replace", Index{0}),
                    freq = json.value("moe_layer_freq", Index{1});
        return layer >= first && freq > 0 && layer % freq == 0;
      }
      case SparseLayers::switch_style: {
        const Index step = json.value("encoder_sparse_step", Index{1});
        return step == 1 || (step > 1 && layer % step == 1);
      }
    }
    return false;
  }
};

namespace detail {

[[noreturn]] inline void config_error(const std::filesystem::path& file, const std::string& what) {
  throw Error("moe::models::read_hf_config: " + file.string() + ": " + what);
}

template <class V>
V config_value(const nlohmann::json& j, std::string_view key, const std::filesystem::path& file) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) config_error(file, "lacks the key \"" + std::string(key) + "\"");
  try {
    return it->get<V>();
  } catch (const nlohmann::json::exception&) {
    config_error(file, "\"" + std::string(key) + "\" is " + it->dump() + ", not a " +
                           (std::is_same_v<V, bool>          ? "boolean"
                            : std::is_same_v<V, std::string> ? "string"
                                                             : "number"));
  }
}

inline std::string substitute(std::string_view pattern, std::string_view key, Index value) {
  std::string s(pattern);
  const auto at = s.find(key);
  if (at != std::string::npos) s.replace(at, key.size(), std::to_string(value));
  return s;
}

}  // namespace detail

/// Reads config.json (a file, or a folder holding one). Throws moe::Error naming the file and the key that is
/// missing, mistyped or unsupported, or listing the supported model_types.
inline HFConfig read_hf_config(const std::filesystem::path& path) {
  const std::filesystem::path file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  std::ifstream in(file);
  if (!in) detail::config_error(file, "cannot be opened");
  HFConfig c;
  c.source = file;
  try {
    c.json = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    detail::config_error(file, std::string("is not JSON: ") + e.what());
  }
  if (!c.json.is_object()) detail::config_error(file, "is not a JSON object");
  const auto type = detail::config_value<std::string>(c.json, "model_type", file);
  const HFArchitecture* arch = nullptr;
  for (const HFArchitecture& a : hf_architectures())
    if (a.model_type == type) arch = &a;
  if (arch == nullptr)
    detail::config_error(file, "model_type \"" + type + "\" is not supported; supported: " + hf_supported_list());
  c.architecture = arch;
  const auto get_index = [&](std::string_view key) { return detail::config_value<Index>(c.json, key, file); };
  c.routed = {.d_model = get_index(arch->d_model_key),
              .d_ff = get_index(arch->d_ff_key),
              .n_experts = get_index(arch->n_experts_key),
              .top_k = arch->top_k_key.empty() ? 1 : get_index(arch->top_k_key)};
  c.n_layers = get_index(arch->n_layers_key);
  if (!arch->shared_d_ff_key.empty()) c.shared_d_ff = get_index(arch->shared_d_ff_key);
  if (!arch->n_shared_key.empty()) c.shared_d_ff = get_index(arch->n_shared_key) * c.routed.d_ff;
  const auto act = detail::config_value<std::string>(c.json, arch->activation_key, file);
  if (act != arch->activation)
    detail::config_error(file, "\"" + std::string(arch->activation_key) + "\" is \"" + act + "\"; the " + type +
                                   " block is supported with \"" + std::string(arch->activation) + "\" only");
  c.router = arch->router();
  if (!arch->renormalize_key.empty())
    c.router.renormalize = detail::config_value<bool>(c.json, arch->renormalize_key, file);
  if (arch->scoring_keys) {
    const auto scoring = detail::config_value<std::string>(c.json, "scoring_func", file);
    if (scoring == "softmax")
      c.router.score = routers::ScoreFunction::softmax;
    else if (scoring == "sigmoid")
      c.router.score = routers::ScoreFunction::sigmoid;
    else
      detail::config_error(file, "\"scoring_func\" is \"" + scoring + "\"; supported: softmax, sigmoid");
    const auto method = detail::config_value<std::string>(c.json, "topk_method", file);
    if (method == "greedy") {
      c.router.n_groups = c.router.top_k_groups = 1;
    } else if (method == "group_limited_greedy" || method == "noaux_tc") {
      c.router.n_groups = get_index("n_group");
      c.router.top_k_groups = get_index("topk_group");
      c.router.group_score_top = method == "noaux_tc" ? 2 : 1;  // V3 scores a group by its top-2 keys, V2 by its max
    } else {
      detail::config_error(file,
                           "\"topk_method\" is \"" + method + "\"; supported: greedy, group_limited_greedy, noaux_tc");
    }
    c.router.selection_bias = method == "noaux_tc";
    c.router.routed_scaling_factor = detail::config_value<double>(c.json, "routed_scaling_factor", file);
    if (arch->scale_only_unnormalized && c.router.renormalize && c.routed.top_k > 1)
      c.router.routed_scaling_factor = 1.0;
  }
  try {
    routers::TopKRouter<double>::validate(c.routed, c.router);  // checks c.routed too; allocates no gate
  } catch (const Error& e) {
    detail::config_error(file, std::string("describes no valid layer: ") + e.what());
  }
  return c;
}

/// The layer type of an architecture's MoE block, for scalar T (one of the four presets), its routed experts in
/// weight storage `Storage` (kernels::PackedOnly<kernels::BF16Weights>: a bf16 checkpoint at its own size).
template <class T, class Storage = kernels::NativeWeights>
using HFMoELayer = std::variant<SwiGLUMoEType<T, Storage>, Qwen2MoEType<T, Storage>, DeepSeekMoEType<T, Storage>,
                                SwitchMoEType<T, Storage>>;

/// Builds the (zero-weight) layer a config describes.
template <class T, class Storage = kernels::NativeWeights>
HFMoELayer<T, Storage> make_hf_moe_layer(const HFConfig& c) {
  const routers::TopKRouter<T> router(c.routed, c.router);
  const HFArchitecture& a = *c.architecture;
  const MoEConfig shared{.d_model = c.routed.d_model, .d_ff = c.shared_d_ff, .n_experts = 1, .top_k = 1};
  using Routed = RoutedSwiGLU<T, Storage>;
  if (!a.shared_gate.empty()) return Qwen2MoEType<T, Storage>(router, Routed(c.routed), Qwen2MoEShared<T>(shared));
  if (!a.shared.empty()) return DeepSeekMoEType<T, Storage>(router, Routed(c.routed), DeepSeekMoEShared<T>(shared));
  if (a.projections[1].empty()) return SwitchMoEType<T, Storage>(router, SwitchExperts<T, Storage>(c.routed));
  return SwiGLUMoEType<T, Storage>(router, Routed(c.routed));
}

/// The Hugging Face names of routed expert `e`'s w1, w3 (empty when not gated) and w2 in layer `index`.
inline std::array<std::string, 3> hf_expert_names(const HFConfig& c, Index index, Index e) {
  const HFArchitecture& a = *c.architecture;
  const std::string prefix = detail::substitute(a.block, "{L}", index) + detail::substitute(a.expert, "{E}", e);
  std::array<std::string, 3> names;
  for (std::size_t i = 0; i < 3; ++i)
    if (!a.projections[i].empty()) names[i] = prefix + std::string(a.projections[i]);
  return names;
}

/// Calls f(hf_name, span of the layer's storage, shape) for every tensor of layer `index`'s MoE block, in the
/// layout of `c`'s architecture: the one name map both loading and saving use. Layer may be const (saving).
/// The routed experts of a PackedOnly bank have no storage to view: their spans are empty.
template <class Layer, class F>
void visit_hf_tensors(Layer& layer, const HFConfig& c, Index index, F&& f) {
  const HFArchitecture& a = *c.architecture;
  const std::string block = detail::substitute(a.block, "{L}", index);
  const auto matrix = [&](const std::string& name, auto view) {
    f(name, std::span(view.data(), static_cast<std::size_t>(view.rows() * view.cols())),
      std::vector<std::int64_t>{view.rows(), view.cols()});
  };
  matrix(block + std::string(a.gate), layer.router().gate());
  if (!a.selection_bias.empty())
    f(block + std::string(a.selection_bias), layer.router().bias(), std::vector<std::int64_t>{c.routed.n_experts});
  const auto mlp = [&](const std::array<std::string, 3>& names, auto& bank, Index e) {
    using Bank = std::remove_cvref_t<decltype(bank)>;
    if constexpr (Bank::trainable) {
      matrix(names[0], bank.w1(e));
      if constexpr (Bank::gated) matrix(names[1], bank.w3(e));
      matrix(names[2], bank.w2(e));
    } else {
      const Index ff = bank.d_ff(), d = bank.d_model();
      for (std::size_t i = 0; i < 3; ++i)
        if (!names[i].empty())
          f(names[i], std::span<typename Bank::Scalar>(),
            i < 2 ? std::vector<std::int64_t>{ff, d} : std::vector<std::int64_t>{d, ff});
    }
  };
  auto& routed = layer.template bank<0>();
  for (Index e = 0; e < c.routed.n_experts; ++e) mlp(hf_expert_names(c, index, e), routed, e);
  if constexpr (std::remove_cvref_t<Layer>::n_banks == 2) {
    auto& shared = layer.template bank<1>();
    const std::string prefix = block + std::string(a.shared);
    mlp({prefix + std::string(a.projections[0]), prefix + std::string(a.projections[1]),
         prefix + std::string(a.projections[2])},
        shared.inner(), 0);
    if constexpr (std::remove_cvref_t<decltype(shared)>::gated)
      matrix(block + std::string(a.shared_gate), shared.gate());
  }
}

/// A checkpoint folder's tensors: model.safetensors, or the shards model.safetensors.index.json lists
/// (opened when first needed, mapped read-only).
class HFCheckpoint {
 public:
  /// Opens `dir`; throws moe::Error when it holds neither file, or the index is not what transformers writes.
  explicit HFCheckpoint(std::filesystem::path dir) : dir_(std::move(dir)) {
    const auto index = dir_ / "model.safetensors.index.json";
    if (std::filesystem::exists(index)) {
      std::ifstream in(index);
      try {
        const auto j = nlohmann::json::parse(in);
        for (const auto& [name, file] : j.at("weight_map").items()) shard_of_[name] = file.get<std::string>();
      } catch (const nlohmann::json::exception& e) {
        throw Error("moe::models::HFCheckpoint: " + index.string() + ": not a safetensors index (" + e.what() + ")");
      }
    } else if (!std::filesystem::exists(dir_ / "model.safetensors")) {
      throw Error("moe::models::HFCheckpoint: " + dir_.string() +
                  " holds neither model.safetensors nor model.safetensors.index.json");
    }
  }

  /// The file holding tensor `name` (opened on first use); throws naming the folder when no file has it.
  const io::Safetensors& file_of(const std::string& name) {
    std::string file = "model.safetensors";
    if (!shard_of_.empty()) {
      const auto it = shard_of_.find(name);
      if (it == shard_of_.end())
        throw io::SafetensorsError(io::SafetensorsErrc::tensor_not_found,
                                   (dir_ / "model.safetensors.index.json").string() + ": no tensor \"" + name + "\"");
      file = it->second;
    }
    auto& slot = files_[file];
    if (!slot)
      slot = std::make_unique<io::Safetensors>(io::Safetensors::open(dir_ / file, {}, "moe::models::HFCheckpoint"));
    return *slot;
  }

 private:
  std::filesystem::path dir_;
  std::map<std::string, std::string> shard_of_;
  std::map<std::string, std::unique_ptr<io::Safetensors>> files_;
};

/// Loads layer `index`'s MoE block of a Hugging Face checkpoint folder into the matching layer type (T = float
/// or double; stored F32, F16, BF16 or F64 values are converted). Every tensor's presence, shape and dtype is
/// checked before any is read; values must be finite. Throws (see the file comment) naming the file and the
/// key or tensor; the layer is built fresh, so nothing half-loaded escapes.
/// With Storage = kernels::PackedOnly<S> the routed experts are packed one at a time from the mapped file (through
/// a temporary of one expert's w1 and w3 in T): the heap holds the packed bank, not a T copy of it.
template <class T, class Storage = kernels::NativeWeights>
HFMoELayer<T, Storage> load_hf_moe_layer(const std::filesystem::path& dir, Index index) {
  const HFConfig c = read_hf_config(dir);
  if (!c.is_moe_layer(index))
    throw Error("moe::models::load_hf_moe_layer: layer " + std::to_string(index) + " of " + c.source.string() +
                " is not a MoE block (the model has " + std::to_string(c.n_layers) +
                " layers; see first_k_dense_replace, decoder_sparse_step, mlp_only_layers or encoder_sparse_step)");
  HFCheckpoint files(dir);
  HFMoELayer<T, Storage> out = make_hf_moe_layer<T, Storage>(c);
  std::visit(
      [&](auto& layer) {
        for (const bool read : {false, true})
          visit_hf_tensors(
              layer, c, index, [&](const std::string& name, auto span, const std::vector<std::int64_t>& shape) {
                const io::Safetensors& file = files.file_of(name);
                const io::TensorView& t = file.tensor(name);
                if (!read) {
                  if (t.shape != shape || !(t.dtype == io::DType::F32 || t.dtype == io::DType::F16 ||
                                            t.dtype == io::DType::BF16 || t.dtype == io::DType::F64))
                    throw io::SafetensorsError(
                        io::SafetensorsErrc::shape_mismatch,
                        file.source() + ": tensor \"" + name + "\" is " + std::string(io::dtype_name(t.dtype)) + " " +
                            io::detail::shape_string(t.shape) + "; the config implies a floating-point " +
                            io::detail::shape_string(shape));
                } else if (!span.empty()) {
                  file.read(name, span, /*check_finite=*/true);
                }
              });
        auto& routed = layer.template bank<0>();
        if constexpr (!std::remove_cvref_t<decltype(routed)>::trainable) {
          const Index ff = c.routed.d_ff, d = c.routed.d_model;
          std::vector<T> w1(static_cast<std::size_t>(ff * d)), w3(routed.gated ? w1.size() : 0);
          const auto read = [&](const std::string& name, std::vector<T>& to) {
            files.file_of(name).read(name, std::span(to), /*check_finite=*/true);
          };
          for (Index e = 0; e < c.routed.n_experts; ++e) {
            const auto names = hf_expert_names(c, index, e);
            read(names[0], w1);
            if (routed.gated) read(names[1], w3);
            routed.pack_expert_hidden(e, ConstMatrixView<T>(w1.data(), ff, d),
                                      routed.gated ? ConstMatrixView<T>(w3.data(), ff, d) : ConstMatrixView<T>());
            read(names[2], w1);  // w2 (d_model, d_ff) has w1's size
            routed.pack_expert_out(e, ConstMatrixView<T>(w1.data(), d, ff));
          }
        }
      },
      out);
  return out;
}

/// Writes a layer's MoE block as layer `index` of architecture `c` in safetensors under the Hugging Face names (in
/// the layer's Scalar: F32 or F64), atomically; `metadata` goes to `__metadata__` ("format": "pt" by default).
template <class Layer>
void save_hf_moe_layer(const std::filesystem::path& path, const Layer& layer, const HFConfig& c, Index index,
                       io::Metadata metadata = {{"format", "pt"}}) {
  std::vector<io::TensorToWrite> tensors;
  visit_hf_tensors(layer, c, index, [&](const std::string& name, auto span, const std::vector<std::int64_t>& shape) {
    tensors.push_back({.name = name,
                       .dtype = io::detail::dtype_of<typename Layer::Scalar>(),
                       .shape = shape,
                       .data = std::as_bytes(span)});
  });
  io::save_safetensors(path, tensors, metadata, "moe::models::save_hf_moe_layer");
}

}  // namespace moe::models
