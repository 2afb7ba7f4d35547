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
/// load_parameters() requires the same names, order, shapes and element type as the model, and reads and
/// checks the whole file before writing anything: after any error the model is unchanged.
///
/// Errors, and nothing else (no std::ios_base::failure):
///  - moe::IoError (a std::system_error): an operating-system call failed: open, read, write or rename.
///    code() is the errno (std::errc::no_such_file_or_directory, is_a_directory, permission_denied,
///    no_space_on_device, ...), path() the path given, what() the function, the operation, the path and the
///    OS reason.
///  - moe::Error: the file was read but its content is not a checkpoint of this model (bad magic, another
///    tensor count, name, element type or shape, truncated, trailing bytes); what() names the file and the
///    field.
/// save_parameters() writes `path + ".tmp"` and renames it over `path`: a failed save leaves an existing file
/// at `path` as it was and removes the temporary.

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../parameter.hpp"

namespace moe::io {

namespace detail {

static_assert(std::endian::native == std::endian::little, "moe::io: the checkpoint format is little-endian");
inline constexpr char k_magic[8] = {'M', 'O', 'E', 'C', 'K', 'P', 'T', '1'};

/// Throws moe::IoError for a failed OS call; `err` is its errno (0: none given, reported as io_error).
[[noreturn]] inline void throw_io(int err, const std::string& path, const std::string& what) {
  throw IoError(err != 0 ? std::error_code(err, std::generic_category()) : std::make_error_code(std::errc::io_error),
                path, what);
}

/// A C stream closed when it goes out of scope (save closes it itself, to see the error of the last flush).
struct File {
  std::FILE* f;
  explicit File(std::FILE* file) : f(file) {}
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (f != nullptr) std::fclose(f);
  }
};

/// Bytes of the checkpoint of `model`: what load_parameters() reads at most (plus one, to see trailing bytes).
template <class Model>
std::size_t file_bytes(Model& model) {
  std::size_t n = sizeof(k_magic) + sizeof(std::uint32_t);
  model.visit_parameters([&](const std::string& name, auto& p) {
    using T = std::remove_cvref_t<decltype(*std::as_const(p).data())>;
    n += sizeof(std::uint32_t) + name.size() + sizeof(std::uint8_t) + 2 * sizeof(std::int64_t) +
         sizeof(T) * static_cast<std::size_t>(p.rows() * p.cols());
  });
  return n;
}

/// Up to `limit` bytes of the file at `path` (fewer when it is shorter). Throws moe::IoError.
inline std::vector<char> read_at_most(const std::string& path, std::size_t limit) {
  const std::string who = "moe::io::load_parameters: ";
  std::error_code ignored;
  if (std::filesystem::is_directory(path, ignored))
    throw IoError(std::make_error_code(std::errc::is_a_directory), path, who + "cannot open " + path + " for reading");
  File file{std::fopen(path.c_str(), "rb")};
  if (file.f == nullptr) throw_io(errno, path, who + "cannot open " + path + " for reading");
  std::vector<char> bytes(limit);
  errno = 0;
  const std::size_t n = std::fread(bytes.data(), 1, limit, file.f);
  if (n < limit && std::ferror(file.f) != 0) throw_io(errno, path, who + "cannot read " + path);
  bytes.resize(n);
  return bytes;
}

/// Reads from an in-memory file, checking every length against what is left (moe::Error when it is short).
class Reader {
 public:
  Reader(const std::vector<char>& bytes, const std::string& path) : bytes_(bytes), path_(path) {}
  template <class U>
  U get(const char* what) {
    U v;
    std::memcpy(&v, bytes_.data() + skip(sizeof(U), what), sizeof(U));
    return v;
  }
  /// Moves past n bytes; returns where they start.
  std::size_t skip(std::size_t n, const char* what) {
    moe::detail::require(n <= bytes_.size() - pos_, "moe::io::load_parameters: ", path_, " is truncated (reading ",
                         what, " at byte ", pos_, ")");
    pos_ += n;
    return pos_ - n;
  }
  const char* at(std::size_t offset) const { return bytes_.data() + offset; }
  bool at_end() const { return pos_ == bytes_.size(); }

 private:
  const std::vector<char>& bytes_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

}  // namespace detail

/// Writes every parameter of `model` (visit order) to `path`, through `path + ".tmp"` renamed over it.
/// Reads the parameters through const access: their version() does not advance. Throws moe::IoError (see the
/// file comment); after a failure an existing file at `path` is unchanged.
template <class Model>
void save_parameters(Model& model, const std::string& path) {
  const std::string who = "moe::io::save_parameters: ", tmp = path + ".tmp";
  std::uint32_t count = 0;
  model.visit_parameters([&](const std::string&, auto&) { ++count; });
  detail::File file{std::fopen(tmp.c_str(), "wb")};
  if (file.f == nullptr) detail::throw_io(errno, path, who + "cannot open " + tmp + " for writing");
  try {
    const auto put = [&](const void* p, std::size_t n) {
      if (std::fwrite(p, 1, n, file.f) != n) detail::throw_io(errno, path, who + "cannot write " + tmp);
    };
    const auto put_value = [&](auto v) { put(&v, sizeof(v)); };
    put(detail::k_magic, sizeof(detail::k_magic));
    put_value(count);
    model.visit_parameters([&](const std::string& name, auto& p) {
      const auto* values = std::as_const(p).data();
      using T = std::remove_cvref_t<decltype(*values)>;
      put_value(static_cast<std::uint32_t>(name.size()));
      put(name.data(), name.size());
      put_value(static_cast<std::uint8_t>(sizeof(T)));
      put_value(static_cast<std::int64_t>(p.rows()));
      put_value(static_cast<std::int64_t>(p.cols()));
      put(values, sizeof(T) * static_cast<std::size_t>(p.rows() * p.cols()));
    });
    const int closed = std::fclose(std::exchange(file.f, nullptr));  // flushes: a full disk shows here
    if (closed != 0) detail::throw_io(errno, path, who + "cannot write " + tmp + " (closing it)");
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      detail::throw_io(errno, path, who + "cannot rename " + tmp + " to " + path);
  } catch (...) {
    if (file.f != nullptr) std::fclose(std::exchange(file.f, nullptr));
    std::remove(tmp.c_str());
    throw;
  }
}

/// Reads `path` into the parameters of `model`; see the file comment for what must match and what is thrown.
/// Reads at most the bytes a checkpoint of this model has (plus one), so a huge wrong file costs no more.
template <class Model>
void load_parameters(Model& model, const std::string& path) {
  const std::vector<char> bytes = detail::read_at_most(path, detail::file_bytes(model) + 1);
  detail::Reader r(bytes, path);
  const char* who = "moe::io::load_parameters: ";
  moe::detail::require(std::memcmp(r.at(r.skip(sizeof(detail::k_magic), "the magic")), detail::k_magic,
                                   sizeof(detail::k_magic)) == 0,
                       who, path, " is not a moe checkpoint (bad magic)");
  const auto count = r.get<std::uint32_t>("the tensor count");
  std::uint32_t expected = 0;
  model.visit_parameters([&](const std::string&, auto&) { ++expected; });
  moe::detail::require(count == expected, who, path, " holds ", count, " tensors, the model has ", expected);

  // First pass: check every header and find every tensor's bytes; second pass: copy them into the model.
  std::vector<std::size_t> offsets;
  offsets.reserve(count);
  model.visit_parameters([&](const std::string& name, auto& p) {
    using T = std::remove_cvref_t<decltype(*std::as_const(p).data())>;
    const auto len = r.get<std::uint32_t>("a name length");
    moe::detail::require(len == name.size(), who, path, " has a tensor name of ", len, " bytes where the model has \"",
                         name, "\"");
    const std::string got(r.at(r.skip(len, "a name")), len);
    moe::detail::require(got == name, who, path, " has tensor \"", got, "\" where the model has \"", name, "\"");
    const auto size = r.get<std::uint8_t>("an element size");
    const auto rows = r.get<std::int64_t>("rows"), cols = r.get<std::int64_t>("cols");
    moe::detail::require(size == sizeof(T), who, path, ": ", name, " has ", int(size), "-byte elements in the file, ",
                         sizeof(T), " in the model");
    moe::detail::require(rows == p.rows() && cols == p.cols(), who, path, ": ", name, " is (", rows, ", ", cols,
                         ") in the file, (", p.rows(), ", ", p.cols(), ") in the model");
    offsets.push_back(r.skip(sizeof(T) * static_cast<std::size_t>(rows * cols), name.c_str()));
  });
  moe::detail::require(r.at_end(), who, path, " has trailing bytes after the last tensor");
  std::size_t i = 0;
  model.visit_parameters([&](const std::string&, auto& p) {
    using T = std::remove_cvref_t<decltype(*std::as_const(p).data())>;
    std::memcpy(static_cast<void*>(p.data()), r.at(offsets[i++]), sizeof(T) * static_cast<std::size_t>(p.rows() * p.cols()));
  });
}

}  // namespace moe::io
