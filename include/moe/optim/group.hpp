#pragma once
/// @file optim/group.hpp
/// @brief A parameter group: the parameters of a model whose visit name starts with a prefix ("router.",
/// "bank0.", "layer1.router."), seen through visit_parameters, so an optimizer or clip_grad_norm runs over
/// that group alone: train the router and freeze the experts (the first stage of sparse upcycling,
/// experts/upcycle.hpp), or give each group its own optimizer and learning rate.

#include <string>
#include <utility>

#include "../config.hpp"

namespace moe::optim {

/// The parameters of `model` (anything with visit_parameters(f(const std::string&, Parameter&)): a layer, a
/// stack, a Model) whose names start with `prefix`. Holds a reference: the model must outlive it. Gradients
/// of the other parameters are still computed by backward; only what visits through the group is touched.
template <class Model>
class ParameterGroup {
 public:
  ParameterGroup(Model& model, std::string prefix) : model_(model), prefix_(std::move(prefix)) {}

  /// f(name, Parameter&) for each parameter of the group, in the model's visit order, with the model's names.
  template <class F>
  void visit_parameters(F&& f) {
    model_.visit_parameters([&](const std::string& name, auto& p) {
      if (name.starts_with(prefix_)) f(name, p);
    });
  }

  const std::string& prefix() const { return prefix_; }  ///< the names' common start

 private:
  Model& model_;
  std::string prefix_;
};

}  // namespace moe::optim
