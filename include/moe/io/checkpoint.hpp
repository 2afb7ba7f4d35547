#pragma once
/// @file io/checkpoint.hpp
/// @brief Saving and loading every parameter a model visits, in a small documented binary format (the
/// safetensors format comes later). All integers little-endian:
///
///   "MOECKPT1"                      8 bytes magic (the 1 is the format version)
///   u32 count                       number of tensors
///   count times:
///     u32 name_length, name bytes   the visitor name, e.g. "bank0.w1"
///     u8  element_size              4 (float) or 8 (double)
///     i64 rows, i64 cols
///     rows * cols elements          row-major, IEEE-754
///
/// load_parameters() requires the same names, order, shapes and element type as the model and reads
/// everything before writing anything: a bad or truncated file throws moe::Error and leaves the model
/// unchanged.

#include <bit>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../parameter.hpp"

namespace moe::io {

namespace detail {

static_assert(std::endian::native == std::endian::little, "moe::io: the checkpoint format is little-endian");
inline constexpr char k_magic[8] = {'M', 'O', 'E', 'C', 'K', 'P', 'T', '1'};

template <class U>
void put(std::ofstream& out, U v) {
  out.write(reinterpret_cast<const char*>(&v), sizeof(U));
}

/// Reads from an in-memory file, checking every length against what is left.
class Reader {
 public:
  Reader(std::vector<char> bytes, std::string path) : bytes_(std::move(bytes)), path_(std::move(path)) {}
  template <class U>
  U get(const char* what) {
    U v;
    take(&v, sizeof(U), what);
    return v;
  }
  void take(void* to, std::size_t n, const char* what) {
    moe::detail::require(n <= bytes_.size() - pos_, "moe::io::load_parameters: ", path_, " is truncated (reading ",
                         what, " at byte ", pos_, ")");
    std::memcpy(to, bytes_.data() + pos_, n);
    pos_ += n;
  }
  bool at_end() const { return pos_ == bytes_.size(); }

 private:
  std::vector<char> bytes_;
  std::string path_;
  std::size_t pos_ = 0;
};

}  // namespace detail

/// Writes every parameter of `model` (visit order) to `path`. Throws moe::Error if the file cannot be written.
template <class Model>
void save_parameters(Model& model, const std::string& path) {
  std::uint32_t count = 0;
  model.visit_parameters([&](const std::string&, auto&) { ++count; });
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  moe::detail::require(bool(out), "moe::io::save_parameters: cannot open ", path, " for writing");
  out.write(detail::k_magic, sizeof(detail::k_magic));
  detail::put(out, count);
  model.visit_parameters([&](const std::string& name, auto& p) {
    using T = std::remove_cvref_t<decltype(*p.data())>;
    detail::put(out, static_cast<std::uint32_t>(name.size()));
    out.write(name.data(), static_cast<std::streamsize>(name.size()));
    detail::put(out, static_cast<std::uint8_t>(sizeof(T)));
    detail::put(out, static_cast<std::int64_t>(p.rows()));
    detail::put(out, static_cast<std::int64_t>(p.cols()));
    out.write(reinterpret_cast<const char*>(p.data()), static_cast<std::streamsize>(sizeof(T) * p.rows() * p.cols()));
  });
  moe::detail::require(bool(out), "moe::io::save_parameters: writing ", path, " failed");
}

/// Reads `path` into the parameters of `model`; see the file comment for what must match.
template <class Model>
void load_parameters(Model& model, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  moe::detail::require(bool(in), "moe::io::load_parameters: cannot open ", path);
  detail::Reader r(std::vector<char>(std::istreambuf_iterator<char>(in), {}), path);
  char magic[8];
  r.take(magic, 8, "the magic");
  moe::detail::require(std::memcmp(magic, detail::k_magic, 8) == 0, "moe::io::load_parameters: ", path,
                       " is not a moe checkpoint (bad magic)");
  const auto count = r.get<std::uint32_t>("the tensor count");
  std::uint32_t expected = 0;
  model.visit_parameters([&](const std::string&, auto&) { ++expected; });
  moe::detail::require(count == expected, "moe::io::load_parameters: ", path, " holds ", count,
                       " tensors, the model has ", expected);

  // First pass: read and check everything into staging buffers; second pass: copy into the model.
  std::vector<std::vector<char>> staged;
  model.visit_parameters([&](const std::string& name, auto& p) {
    using T = std::remove_cvref_t<decltype(*p.data())>;
    const auto len = r.get<std::uint32_t>("a name length");
    moe::detail::require(len <= 4096, "moe::io::load_parameters: ", path, ": name length ", len, " is not plausible");
    std::string got(len, '\0');
    r.take(got.data(), len, "a name");
    moe::detail::require(got == name, "moe::io::load_parameters: ", path, " has tensor \"", got, "\" where the model has \"",
                         name, "\"");
    const auto size = r.get<std::uint8_t>("an element size");
    const auto rows = r.get<std::int64_t>("rows"), cols = r.get<std::int64_t>("cols");
    moe::detail::require(size == sizeof(T), "moe::io::load_parameters: ", name, " has ", int(size),
                         "-byte elements in the file, ", sizeof(T), " in the model");
    moe::detail::require(rows == p.rows() && cols == p.cols(), "moe::io::load_parameters: ", name, " is (", rows, ", ",
                         cols, ") in the file, (", p.rows(), ", ", p.cols(), ") in the model");
    staged.emplace_back(sizeof(T) * static_cast<std::size_t>(rows * cols));
    r.take(staged.back().data(), staged.back().size(), name.c_str());
  });
  moe::detail::require(r.at_end(), "moe::io::load_parameters: ", path, " has trailing bytes after the last tensor");
  std::size_t i = 0;
  model.visit_parameters([&](const std::string&, auto& p) {
    std::memcpy(static_cast<void*>(p.data()), staged[i].data(), staged[i].size());
    ++i;
  });
}

}  // namespace moe::io
