#pragma once
/// @file io/checkpoint.hpp
/// @brief Checkpoints in safetensors (io/safetensors.hpp): what a model needs to resume, in a file other tools
/// read.
///
///  - every parameter (visit_parameters) as a (rows, cols) tensor named as visited ("router.gate", "bank0.w1"),
///    in the model's Scalar (F32 or F64);
///  - every state buffer (visit_state: a selection bias, a frozen LoRA base) as a 1-D tensor under its name;
///  - with an optimizer, its state (visit_state(model, f): moments, "step") under "optimizer.<name>", counters as
///    I64;
///  - `__metadata__`: {"format": "moe", "moe_checkpoint": "2"} and the caller's entries.
///
/// load_checkpoint() requires exactly the model's tensors: the same names (no missing, no extra one), shapes
/// and element types. It checks the whole file (mapped read-only) before writing anything, so after
/// any error the model (and the optimizer) are unchanged; it returns the file's metadata.
///
/// Errors: moe::IoError (a std::system_error) when an operating-system call fails (open, map, write, fsync,
/// rename; code() is the errno, path() the file); moe::Error when the file is not safetensors
/// (io::SafetensorsError, naming the rule) or not a checkpoint of this model (naming the file and the tensor).
/// save_checkpoint() writes atomically (a temporary in the same folder, fsync, rename): a failed save leaves
/// an existing file at `path` as it was. (The earlier home-made binary format, "MOECKPT1", is gone.)

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "safetensors.hpp"

namespace moe::io {

/// Metadata of a checkpoint (safetensors `__metadata__`).
using Metadata = std::map<std::string, std::string>;

namespace detail {

/// A model whose state a checkpoint holds besides its parameters (MoELayer and Stack of trainable policies).
template <class Model>
concept HasState = requires(Model& m) {
  m.visit_state([](const std::string&, auto) {});
};

template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return DType::F32;
  else if constexpr (std::is_same_v<T, double>)
    return DType::F64;
  else
    return DType::I64;
}

// One tensor of a checkpoint: where its values live in the model (or the optimizer).
struct Slot {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::span<std::byte> bytes;  // the live buffer
};

// Every tensor of the checkpoint of `model` (and `optimizer`, unless it is nullptr), in visit order. The
// parameters are read through const access (their version() does not advance); load writes through p.data().
template <class Model, class Optimizer>
std::vector<Slot> slots(Model& model, Optimizer* optimizer, bool for_writing) {
  std::vector<Slot> out;
  model.visit_parameters([&](const std::string& name, auto& p) {
    using T = std::remove_cvref_t<decltype(*std::as_const(p).data())>;
    T* values = for_writing ? p.data() : const_cast<T*>(std::as_const(p).data());
    out.push_back({name,
                   dtype_of<T>(),
                   {p.rows(), p.cols()},
                   std::as_writable_bytes(std::span<T>(values, static_cast<std::size_t>(p.rows() * p.cols())))});
  });
  const auto state = [&](const std::string& prefix) {
    return [&out, prefix](const std::string& name, auto values) {
      using T = typename decltype(values)::value_type;
      out.push_back(
          {prefix + name, dtype_of<T>(), {static_cast<std::int64_t>(values.size())}, std::as_writable_bytes(values)});
    };
  };
  if constexpr (HasState<Model>) model.visit_state(state(""));
  if constexpr (!std::is_same_v<Optimizer, std::nullptr_t>)
    if (optimizer != nullptr) optimizer->visit_state(model, state("optimizer."));
  return out;
}

template <class Model, class Optimizer>
void save(Model& model, Optimizer* optimizer, const std::filesystem::path& path, const Metadata& metadata) {
  std::vector<TensorToWrite> tensors;
  for (const Slot& s : slots(model, optimizer, false)) tensors.push_back({s.name, s.dtype, s.shape, s.bytes});
  Metadata m = metadata;
  m["format"] = "moe";
  m["moe_checkpoint"] = "2";
  save_safetensors(path, tensors, m, "moe::io::save_checkpoint");
}

template <class Model, class Optimizer>
Metadata load(Model& model, Optimizer* optimizer, const std::filesystem::path& path) {
  // The mapping is read-only and stays open: every tensor is checked against it, then copied from it.
  const Safetensors file = Safetensors::open(path, {}, "moe::io::load_checkpoint");
  const std::string who = "moe::io::load_checkpoint: " + path.string();
  std::vector<Slot> expected = slots(model, optimizer, false);
  moe::detail::require(file.tensors().size() == expected.size(), who, " holds ", file.tensors().size(),
                       " tensors, the model has ", expected.size());
  // Check every tensor first; only then write the model (all or nothing).
  std::vector<const TensorView*> source;
  for (const Slot& s : expected) {
    const TensorView* t = file.find(s.name);
    moe::detail::require(t != nullptr, who, " has no tensor \"", s.name, "\" (the model's names are visit_parameters'",
                         " and visit_state's)");
    moe::detail::require(dtype_size(t->dtype) == dtype_size(s.dtype), who, ": ", s.name, " has ", dtype_size(t->dtype),
                         "-byte elements in the file, ", dtype_size(s.dtype), " in the model");
    moe::detail::require(t->dtype == s.dtype, who, ": ", s.name, " is ", dtype_name(t->dtype), " in the file, ",
                         dtype_name(s.dtype), " in the model");
    if (t->shape != s.shape)
      throw Error(who + ": " + s.name + " is " + detail::shape_string(t->shape) + " in the file, " +
                  detail::shape_string(s.shape) + " in the model");
    source.push_back(t);
  }
  std::size_t i = 0;
  for (const Slot& s : slots(model, optimizer, true)) {  // through the writing accessors: versions advance
    std::copy(source[i]->data.begin(), source[i]->data.end(), s.bytes.begin());
    ++i;
  }
  return file.metadata();
}

}  // namespace detail

/// Writes every parameter and state buffer of `model` to `path` (see the file comment), with `metadata`.
template <class Model>
void save_checkpoint(Model& model, const std::filesystem::path& path, const Metadata& metadata = {}) {
  detail::save(model, static_cast<std::nullptr_t*>(nullptr), path, metadata);
}
/// As above, and the optimizer's state ("optimizer.<name>"): everything a training run needs to resume.
template <class Model, class Optimizer>
requires(!std::convertible_to<Optimizer&, const std::filesystem::path&>) void save_checkpoint(
    Model& model, Optimizer& optimizer, const std::filesystem::path& path, const Metadata& metadata = {}) {
  detail::save(model, &optimizer, path, metadata);
}

/// Reads `path` into `model`; returns the file's metadata. See the file comment for what must match.
template <class Model>
Metadata load_checkpoint(Model& model, const std::filesystem::path& path) {
  return detail::load(model, static_cast<std::nullptr_t*>(nullptr), path);
}
/// As above, and the optimizer's state.
template <class Model, class Optimizer>
requires(!std::convertible_to<Optimizer&, const std::filesystem::path&>) Metadata
    load_checkpoint(Model& model, Optimizer& optimizer, const std::filesystem::path& path) {
  return detail::load(model, &optimizer, path);
}

}  // namespace moe::io
