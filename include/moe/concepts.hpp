#pragma once
/// @file concepts.hpp
/// @brief The contracts of the policies that MoELayer composes. Each concept's comment is the contract;
/// MoELayer turns a failed concept into one static_assert sentence naming what is missing.

#include <concepts>

#include "config.hpp"
#include "workspace.hpp"

namespace moe {

/// A floating-point scalar the kernels support.
template <class T>
concept Scalar = std::same_as<T, float> || std::same_as<T, double>;

/// A router scores tokens and chooses, per token, `top_k()` slots of (expert id, weight).
///
/// Requires: `R::Scalar`; `d_model()`, `n_experts()`, `top_k()`; and
/// `route(x, ids, weights, arena)` const, which reads x (n_tokens, d_model) and writes
/// ids (n_tokens, top_k) with distinct experts in [0, n_experts) and weights (n_tokens, top_k).
/// Scratch comes from `arena` only (it may be a measuring arena that returns nullptr: then the router
/// must only take() what it needs and return), so routing never allocates.
template <class R>
concept Router = Scalar<typename R::Scalar> &&
    requires(const R& r, ConstMatrixView<typename R::Scalar> x, Index* ids, typename R::Scalar* w, Arena& arena) {
      { r.d_model() } -> std::convertible_to<Index>;
      { r.n_experts() } -> std::convertible_to<Index>;
      { r.top_k() } -> std::convertible_to<Index>;
      { r.route(x, ids, w, arena) } -> std::same_as<void>;
    };

/// An expert bank holds `n_experts()` experts of one kind and runs them on rows grouped by expert.
///
/// Requires: `B::Scalar`; `d_model()`, `n_experts()`; and `forward(xs, offsets, ys, arena)` const,
/// where xs, ys are (rows, d_model) grouped by expert and the bank's expert e owns rows
/// [offsets[e], offsets[e+1]). The bank writes every row of ys in its range and may split the work
/// over threads, but each output element must be computed by one thread in a fixed order
/// (results identical for any thread count). Scratch comes from `arena` as for Router.
template <class B>
concept ExpertBank = Scalar<typename B::Scalar> &&
    requires(const B& b, ConstMatrixView<typename B::Scalar> xs, const Index* offsets,
             MatrixView<typename B::Scalar> ys, Arena& arena) {
      { b.d_model() } -> std::convertible_to<Index>;
      { b.n_experts() } -> std::convertible_to<Index>;
      { b.forward(xs, offsets, ys, arena) } -> std::same_as<void>;
    };

}  // namespace moe
