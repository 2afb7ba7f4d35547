#pragma once
/// @file workspace.hpp
/// @brief Scratch memory for the forward pass: a caller-owned Workspace that grows only when a call
/// needs more than it has, and an Arena that carves aligned buffers out of it.
///
/// The layer sizes its scratch with the same carving code that uses it: an Arena without memory only
/// measures (workspace_bytes), an Arena over a Workspace hands out pointers (forward). So the size query
/// and the use can never disagree, and a forward at the same or a smaller n_tokens never allocates.

#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <new>

#include "config.hpp"

namespace moe {

/// Alignment of every buffer the Arena hands out: one cache line, one AVX-512 register.
inline constexpr std::size_t k_workspace_alignment = 64;

/// Caller-owned scratch memory. Not thread-safe: give each concurrent caller its own Workspace.
class Workspace {
 public:
  Workspace() = default;
  /// Reserves `bytes` up front.
  explicit Workspace(std::size_t bytes) { reserve(bytes); }

  /// Makes the capacity at least `bytes`; reallocates (discarding contents) only when growing.
  void reserve(std::size_t bytes) {
    if (bytes <= capacity_) return;
    data_.reset(static_cast<std::byte*>(::operator new(bytes, std::align_val_t{k_workspace_alignment})));
    capacity_ = bytes;
    ++allocations_;
  }
  std::size_t capacity() const { return capacity_; }        ///< bytes available
  std::size_t allocations() const { return allocations_; }  ///< how many times the buffer was (re)allocated
  std::byte* data() const { return data_.get(); }           ///< start of the buffer (64-byte aligned)

 private:
  struct Free {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t{k_workspace_alignment}); }
  };
  std::unique_ptr<std::byte, Free> data_;
  std::size_t capacity_ = 0;
  std::size_t allocations_ = 0;
};

/// Bump allocator over a Workspace. Default-constructed, it has no memory and only counts bytes.
class Arena {
 public:
  /// A measuring arena: take() returns nullptr and used() tells the bytes a real run would need.
  Arena() = default;
  /// Carves from `ws`, which must already hold enough bytes (checked on every take()).
  explicit Arena(Workspace& ws) : base_(ws.data()), capacity_(ws.capacity()), measuring_(false) {}

  /// `n` elements of T, 64-byte aligned; nullptr when measuring. Throws moe::Error when n < 0 or the bytes
  /// in use would exceed PTRDIFF_MAX.
  template <class T>
  T* take(Index n) {
    const std::size_t offset = (used_ + k_workspace_alignment - 1) / k_workspace_alignment * k_workspace_alignment;
    detail::require(n >= 0 && n <= detail::k_max_elements<T> &&
                        static_cast<std::size_t>(n) * sizeof(T) <= k_max_bytes - std::min(offset, k_max_bytes),
                    "moe::Arena::take: ", n, " elements of ", sizeof(T), " bytes after ", offset,
                    " bytes in use: negative, or beyond PTRDIFF_MAX bytes");
    used_ = offset + static_cast<std::size_t>(n) * sizeof(T);
    peak_ = std::max(peak_, used_);
    if (measuring_) return nullptr;
    detail::require(used_ <= capacity_, "moe::Arena: workspace of ", capacity_, " bytes is too small (needs ",
                    used_, "); size it with workspace_bytes()");
    return reinterpret_cast<T*>(base_ + offset);
  }
  /// Gives back everything taken after `mark` (a value of used()): scratch of consecutive stages is shared.
  void rewind(std::size_t mark) { used_ = std::min(used_, mark); }
  std::size_t used() const { return used_; }  ///< bytes in use now, with alignment padding
  std::size_t peak() const { return peak_; }  ///< most bytes ever in use: what the Workspace must hold
  bool measuring() const { return measuring_; }

 private:
  static constexpr std::size_t k_max_bytes = static_cast<std::size_t>(std::numeric_limits<Index>::max());
  std::byte* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
  std::size_t peak_ = 0;
  bool measuring_ = true;
};

}  // namespace moe
