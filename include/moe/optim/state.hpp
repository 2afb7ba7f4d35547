#pragma once
/// @file optim/state.hpp
/// @brief Per-parameter optimizer state, keyed by the parameter's visitor name, so one optimizer serves a
/// layer, a stack of layers or any model with visit_parameters(f(name, Parameter&)).

#include <map>
#include <span>
#include <string>
#include <vector>

#include "../config.hpp"
#include "../parameter.hpp"

namespace moe::optim {

/// `n_buffers` zero-initialised buffers per parameter, created at the parameter's first step.
template <class T>
class ParameterState {
 public:
  explicit ParameterState(int n_buffers) : n_buffers_(n_buffers) {}

  /// The buffers of parameter `name` (sized like `p`); throws moe::Error if its size changed.
  std::vector<std::vector<T>>& of(const std::string& name, const Parameter<T>& p) {
    const auto size = static_cast<std::size_t>(p.rows() * p.cols());
    auto [it, inserted] = state_.try_emplace(name, static_cast<std::size_t>(n_buffers_), std::vector<T>(size, T(0)));
    detail::require(it->second.empty() || it->second[0].size() == size, "moe::optim: parameter ", name,
                    " changed size since the optimizer last saw it");
    return it->second;
  }

  /// Calls f(name + "." + suffixes[b], std::span<T>) for each buffer b of every parameter of `model`, in the
  /// model's visit order, creating the buffers a parameter has not had yet (so state can be loaded into a
  /// fresh optimizer).
  template <class Model, class F>
  void visit(Model& model, std::span<const char* const> suffixes, F&& f) {
    model.visit_parameters([&](const std::string& name, const Parameter<T>& p) {
      auto& buffers = of(name, p);
      for (std::size_t b = 0; b < buffers.size(); ++b) f(name + "." + suffixes[b], std::span<T>(buffers[b]));
    });
  }

 private:
  int n_buffers_;
  std::map<std::string, std::vector<std::vector<T>>> state_;
};

}  // namespace moe::optim
