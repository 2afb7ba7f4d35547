#pragma once
/// @file io/safetensors.hpp
/// @brief safetensors, read and written as its specification says (huggingface/safetensors, README "Format";
/// the checks follow the reference reader, safetensors/src/tensor.rs, and ../shared/RELIABILITY.md §5):
///
///   u64 N (little-endian) | N bytes: UTF-8 JSON header | data section
///
/// The header is an object: "__metadata__" (optional, string → string) and, per tensor, {"dtype": "F32",
/// "shape": [rows, cols], "data_offsets": [begin, end]} with offsets relative to the data section.
///
/// What a file must be to load (each rule's error code in parentheses, the reference's variant names):
///  - at least 8 bytes (header_too_small); N ≤ 100 000 000 (header_too_large) and 8 + N ≤ the file size
///    (invalid_header_length); the header valid UTF-8 (invalid_header_utf8), a JSON object (leading and
///    trailing whitespace allowed, as the reference writer pads) of that schema (invalid_header_deserialization);
///  - stricter than the reference: no key twice in any object (duplicate_key); nesting ≤ 64 and ≤ 1 000 000
///    keys (limit_exceeded); every shape and offset a JSON integer in [0, 2^63) (invalid_header_deserialization);
///    a dtype we cannot convert (F8, F4, ..., U16/U32/U64) is refused by name (unsupported_dtype);
///  - sorted by offsets, each tensor starts where the previous one ended (no gap, no overlap, end ≥ begin:
///    invalid_offset), its element count and byte size fit in 63 bits (validation_overflow) and equal
///    end − begin (tensor_invalid_info), and the last end is the end of the file (metadata_incomplete_buffer:
///    trailing or missing bytes).
/// Fields other than dtype, shape and data_offsets in a tensor entry are ignored, as the reference does.
/// Every error is a moe::io::SafetensorsError (a moe::Error) whose message names the file, the tensor and the
/// rule; code() says which rule. Nothing is read outside the file: the views are checked before they exist.
///
/// Tensor data is read through read<T>(), which converts from the stored dtype with memcpy (no misaligned
/// access, whatever the offsets) and, asked to, rejects NaN and ±inf naming the tensor.
///
/// Writing (save_safetensors) is deterministic: tensors ordered by element size (largest first), then name,
/// as the reference writer does, so every tensor's offset is a multiple of its element size and the data
/// section starts 8-byte aligned (the header is padded with spaces); the file is written to a temporary in
/// the same folder, flushed to disk (fsync) and renamed over the destination, so a crash never leaves a
/// half-written file under the final name.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../error.hpp"

namespace moe::io {

/// The element types this library reads and writes.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

/// Bytes per element.
constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
    case DType::I64:
      return 8;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
      return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL:
      return 1;
  }
  return 0;
}

/// The name safetensors uses ("F32", "BF16", ...).
constexpr std::string_view dtype_name(DType t) {
  constexpr std::string_view names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"};
  return names[static_cast<int>(t)];
}

/// Which rule a file broke (see the file comment).
enum class SafetensorsErrc {
  header_too_small,
  header_too_large,
  invalid_header_length,
  invalid_header_utf8,
  invalid_header_deserialization,
  duplicate_key,
  limit_exceeded,
  unsupported_dtype,
  invalid_offset,
  validation_overflow,
  tensor_invalid_info,
  metadata_incomplete_buffer,
  tensor_not_found,
  non_finite,
  shape_mismatch,
};

/// A file that is not valid safetensors, or a tensor that is not what the caller asked for.
class SafetensorsError : public Error {
 public:
  SafetensorsError(SafetensorsErrc code, const std::string& message) : Error(message), code_(code) {}
  SafetensorsErrc code() const noexcept { return code_; }  ///< the rule broken

 private:
  SafetensorsErrc code_;
};

/// Limits against hostile headers (RELIABILITY.md S3/S5).
struct SafetensorsLimits {
  std::uint64_t max_header_bytes = 100'000'000;  ///< the reference's MAX_HEADER_SIZE
  int max_depth = 64;                            ///< JSON nesting
  std::size_t max_keys = 1'000'000;              ///< object keys in the whole header
};

/// One tensor of a file: its bytes are a view into the file.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;  ///< numel() * dtype_size(dtype) bytes, any alignment

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;  // validated not to overflow
    return n;
  }
};

namespace detail {

/// "(2, 3)": a shape for error messages.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t k = 0; k < shape.size(); ++k) {
    if (k > 0) out += ", ";
    out += std::to_string(shape[k]);
  }
  return out + ")";
}

inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign != 0 ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float bf16_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

// Safetensors dtype names this library does not convert: refused by name rather than as unknown JSON.
inline bool is_unsupported_dtype(std::string_view s) {
  constexpr std::string_view known[] = {"F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2",
                                        "F4",      "U16",     "U32",     "U64",     "C64"};
  return std::find(std::begin(known), std::end(known), s) != std::end(known);
}

inline std::optional<DType> parse_dtype(std::string_view s) {
  for (int i = 0; i <= static_cast<int>(DType::BOOL); ++i)
    if (dtype_name(static_cast<DType>(i)) == s) return static_cast<DType>(i);
  return std::nullopt;
}

// True when [p, p + n) is well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
inline bool valid_utf8(const unsigned char* p, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0, min = 0;
    if ((c & 0xE0) == 0xC0)
      len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
      len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
      len = 4, cp = c & 0x07, min = 0x10000;
    else
      return false;
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// A read-only mapping of a whole file (POSIX mmap); empty files map to nothing.
class Mapping {
 public:
  // `who` names the caller's function in errors.
  Mapping(const std::filesystem::path& path, const char* who) : who_(who) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, "open");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      fail(path, "stat", e);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(path, "map", S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        fail(path, "map", e);
      }
      data_ = p;
    }
    ::close(fd);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }
  std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(data_), size_}; }

 private:
  [[noreturn]] void fail(const std::filesystem::path& path, const char* op, int e = errno) const {
    throw IoError(std::error_code(e, std::generic_category()), path.string(),
                  std::string(who_) + ": cannot " + op + " " + path.string());
  }
  const char* who_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// A parsed, validated safetensors file: its tensors (views into the file's bytes) and its metadata.
class Safetensors {
 public:
  static constexpr std::uint64_t k_max_dim = std::uint64_t{1} << 63;  ///< shapes and offsets lie below

  /// Parses and validates the bytes of a whole file; the views point into `bytes`, which must outlive the
  /// result. `source` names the file in error messages.
  static Safetensors parse(std::span<const std::byte> bytes, std::string source = "<memory>",
                           const SafetensorsLimits& limits = {}) {
    Safetensors f;
    f.source_ = std::move(source);
    f.load(bytes, limits);
    return f;
  }

  /// Maps `path` read-only (POSIX mmap) and parses it; the mapping lives as long as the result (and its copies).
  /// Throws moe::IoError when the file cannot be opened or mapped; its message starts with `who` (the function
  /// the caller called).
  static Safetensors open(const std::filesystem::path& path, const SafetensorsLimits& limits = {},
                          const char* who = "moe::io::Safetensors::open") {
    auto mapping = std::make_shared<const detail::Mapping>(path, who);
    Safetensors f = parse(mapping->bytes(), path.string(), limits);
    f.mapping_ = std::move(mapping);
    return f;
  }

  /// The tensors, ordered by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  /// `__metadata__` (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The file named in errors.
  const std::string& source() const { return source_; }

  /// The tensor called `name`, or nullptr.
  const TensorView* find(std::string_view name) const {
    const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                     [](const TensorView& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }
  /// The tensor called `name`; throws (tensor_not_found) naming the file when there is none.
  const TensorView& tensor(std::string_view name) const {
    const TensorView* t = find(name);
    if (t == nullptr) fail(SafetensorsErrc::tensor_not_found, name, "no tensor of that name");
    return *t;
  }

  /// Converts tensor `name` into `out` (its numel() elements, row-major) as T: float or double from F64, F32,
  /// F16, BF16; an integer type from the integer dtypes. Throws naming the tensor when `out` has another size,
  /// the conversion is not one of those (shape_mismatch, unsupported_dtype), or, with check_finite, a value is
  /// NaN or ±inf (non_finite, naming the first element). Reads with memcpy: any alignment is fine.
  template <class T>
  void read(std::string_view name, std::span<T> out, bool check_finite = false) const {
    const TensorView& t = tensor(name);
    if (static_cast<std::int64_t>(out.size()) != t.numel())
      fail(SafetensorsErrc::shape_mismatch, name,
           "holds " + std::to_string(t.numel()) + " elements, the destination " + std::to_string(out.size()));
    const std::byte* p = t.data.data();
    const std::size_t es = dtype_size(t.dtype);
    const auto load = [&]<class S>(S, std::size_t i) {
      S v;
      std::memcpy(&v, p + i * es, sizeof(S));
      return v;
    };
    constexpr bool floating = std::is_floating_point_v<T>;
    for (std::size_t i = 0; i < out.size(); ++i) {
      if constexpr (floating) {
        double v = 0;
        switch (t.dtype) {
          case DType::F64:
            v = load(double{}, i);
            break;
          case DType::F32:
            v = load(float{}, i);
            break;
          case DType::F16:
            v = detail::f16_to_float(load(std::uint16_t{}, i));
            break;
          case DType::BF16:
            v = detail::bf16_to_float(load(std::uint16_t{}, i));
            break;
          default:
            fail(SafetensorsErrc::unsupported_dtype, name,
                 std::string("is ") + std::string(dtype_name(t.dtype)) + ", not a floating-point dtype");
        }
        if (check_finite && !std::isfinite(v))
          fail(SafetensorsErrc::non_finite, name, "element " + std::to_string(i) + " is " + std::to_string(v));
        out[i] = static_cast<T>(v);
      } else {
        std::int64_t v = 0;
        switch (t.dtype) {
          case DType::I64:
            v = load(std::int64_t{}, i);
            break;
          case DType::I32:
            v = load(std::int32_t{}, i);
            break;
          case DType::I16:
            v = load(std::int16_t{}, i);
            break;
          case DType::I8:
            v = load(std::int8_t{}, i);
            break;
          case DType::U8:
          case DType::BOOL:
            v = load(std::uint8_t{}, i);
            break;
          default:
            fail(SafetensorsErrc::unsupported_dtype, name,
                 std::string("is ") + std::string(dtype_name(t.dtype)) + ", not an integer dtype");
        }
        if (v < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
            (v > 0 && static_cast<std::uint64_t>(v) > static_cast<std::uint64_t>(std::numeric_limits<T>::max())))
          fail(SafetensorsErrc::shape_mismatch, name,
               "element " + std::to_string(i) + " = " + std::to_string(v) + " does not fit the destination type");
        out[i] = static_cast<T>(v);
      }
    }
  }

 private:
  [[noreturn]] void fail(SafetensorsErrc code, std::string_view tensor, const std::string& what) const {
    std::string m = "moe::io::Safetensors: " + source_;
    if (!tensor.empty()) m += ": tensor \"" + std::string(tensor) + "\"";
    throw SafetensorsError(code, m + ": " + what);
  }

  // One tensor entry of the header, as parsed.
  struct RawEntry {
    std::string name{}, dtype{};
    std::vector<std::uint64_t> shape{}, offsets{};
    bool has_dtype = false, has_shape = false, has_offsets = false;
  };

  // nlohmann::json's SAX interface, building only what the file needs (no DOM, so no cost beyond one pass:
  // DOM parsing with a callback rescans parent objects, quadratic in the tensor count). Rejects a duplicate
  // key, too deep a nesting, too many keys and every schema error as it reads.
  struct HeaderReader {
    const Safetensors* file;
    const SafetensorsLimits* limits;
    std::vector<RawEntry>* entries;
    std::map<std::string, std::string>* metadata;
    std::vector<std::unordered_set<std::string>> keys;  // per open object, the keys seen
    std::size_t n_keys = 0;
    int depth = 0;               // open objects and arrays
    std::string top{}, field{};  // the key at depth 1 (tensor or __metadata__) and at depth 2
    int skip_from = 0;           // > 0: inside an ignored field's value opened at this depth

    [[noreturn]] void schema(const std::string& what) const {
      file->fail(SafetensorsErrc::invalid_header_deserialization,
                 top == "__metadata__" ? std::string_view() : std::string_view(top), what);
    }
    bool metadata_section() const { return top == "__metadata__"; }
    // A scalar value arrived at the current depth.
    void scalar(const char* kind) {
      if (skip_from > 0) return;
      if (depth == 0) schema("the header is not a JSON object");
      if (depth == 1)
        schema(metadata_section() ? "__metadata__ is not an object"
                                  : "needs an object with dtype, shape and data_offsets");
      if (depth == 2 && metadata_section()) schema("__metadata__[\"" + field + "\"] is a " + kind + ", not a string");
      if (depth == 2 && (field == "shape" || field == "data_offsets"))
        schema(field + " is a " + kind + ", not an array");
      if (depth == 2 && field == "dtype") schema(std::string("dtype is a ") + kind + ", not a string");
      if (depth == 3) schema(field + " holds a " + kind + ", not a non-negative integer");
    }
    void open(bool object) {
      if (++depth > limits->max_depth)
        file->fail(SafetensorsErrc::limit_exceeded, {},
                   "the header nests deeper than " + std::to_string(limits->max_depth));
      if (object) keys.emplace_back();
      if (skip_from > 0) return;
      if (depth == 1 && !object) schema("the header is not a JSON object");
      if (depth == 2) {
        if (metadata_section() && !object) schema("__metadata__ is not an object");
        if (!metadata_section()) {
          if (!object) schema("needs an object with dtype, shape and data_offsets");
          entries->push_back({.name = top});
        }
      }
      if (depth == 3) {
        if (metadata_section()) schema("__metadata__[\"" + field + "\"] is not a string");
        if (field == "shape" || field == "data_offsets") {
          if (object) schema(field + " is an object, not an array");
          (field == "shape" ? entries->back().has_shape : entries->back().has_offsets) = true;
        } else if (field == "dtype") {
          schema("dtype is not a string");
        } else {
          skip_from = depth;  // an unknown field: ignored, as the reference does
        }
      }
      if (depth == 4 && skip_from == 0) schema(field + " holds a nested value, not a non-negative integer");
    }
    void close(bool object) {
      if (object) keys.pop_back();
      if (skip_from == depth) skip_from = 0;
      if (depth == 2 && !metadata_section() && skip_from == 0) {
        const RawEntry& e = entries->back();
        if (!e.has_dtype || !e.has_shape || !e.has_offsets)
          schema("needs an object with dtype, shape and data_offsets");
        if (e.offsets.size() != 2) schema("data_offsets is not a pair");
      }
      --depth;
    }

    bool null() { return scalar("null"), true; }
    bool boolean(bool) { return scalar("boolean"), true; }
    bool number_integer(std::int64_t) { return scalar("negative number"), true; }
    bool number_float(double, const std::string&) { return scalar("fractional number"), true; }
    bool number_unsigned(std::uint64_t v) {
      if (skip_from > 0 || depth != 3) return scalar("number"), true;
      auto& list = field == "shape" ? entries->back().shape : entries->back().offsets;
      if (v >= k_max_dim)
        file->fail(SafetensorsErrc::validation_overflow, top,
                   field + " holds " + std::to_string(v) + ", not below 2^63");
      list.push_back(v);
      return true;
    }
    bool string(std::string& v) {
      if (skip_from == 0 && depth == 2 && metadata_section()) {
        (*metadata)[field] = v;
        return true;
      }
      if (skip_from == 0 && depth == 2 && field == "dtype") {
        entries->back().dtype = v;
        entries->back().has_dtype = true;
        return true;
      }
      return scalar("string"), true;
    }
    bool binary(nlohmann::json::binary_t&) { return scalar("binary value"), true; }
    bool start_object(std::size_t) { return open(true), true; }
    bool end_object() { return close(true), true; }
    bool start_array(std::size_t) { return open(false), true; }
    bool end_array() { return close(false), true; }
    bool key(std::string& k) {
      if (++n_keys > limits->max_keys)
        file->fail(SafetensorsErrc::limit_exceeded, {},
                   "the header has more than " + std::to_string(limits->max_keys) + " keys");
      if (!keys.back().insert(k).second)
        file->fail(SafetensorsErrc::duplicate_key, depth == 1 ? std::string_view(k) : std::string_view(top),
                   "key \"" + k + "\" appears twice in one object");
      if (depth == 1) top = k;
      if (depth == 2) field = k;
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception& e) {
      file->fail(SafetensorsErrc::invalid_header_deserialization, {},
                 std::string("the header is not valid JSON: ") + e.what());
    }
  };

  void load(std::span<const std::byte> bytes, const SafetensorsLimits& limits) {
    if (bytes.size() < 8)
      fail(SafetensorsErrc::header_too_small, {},
           "the file has " + std::to_string(bytes.size()) + " bytes, fewer than the 8 of the header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
    if (n > limits.max_header_bytes)
      fail(SafetensorsErrc::header_too_large, {},
           "the header length " + std::to_string(n) + " exceeds " + std::to_string(limits.max_header_bytes));
    if (n > bytes.size() - 8)
      fail(SafetensorsErrc::invalid_header_length, {},
           "the header length " + std::to_string(n) + " runs past the end of the file (" +
               std::to_string(bytes.size()) + " bytes)");
    const auto* header = reinterpret_cast<const unsigned char*>(bytes.data() + 8);
    if (!detail::valid_utf8(header, n)) fail(SafetensorsErrc::invalid_header_utf8, {}, "the header is not valid UTF-8");
    const std::string_view text(reinterpret_cast<const char*>(header), n);
    std::vector<RawEntry> entries;
    HeaderReader reader{this, &limits, &entries, &metadata_, {}};
    try {
      nlohmann::json::sax_parse(text.begin(), text.end(), &reader);
    } catch (const nlohmann::json::exception& e) {  // the lexer's errors (e.g. a number out of range)
      fail(SafetensorsErrc::invalid_header_deserialization, {},
           std::string("the header is not valid JSON: ") + e.what());
    }
    const std::span<const std::byte> data = bytes.subspan(8 + n);
    struct Range {
      std::uint64_t begin, end;
      std::size_t index;
    };
    std::vector<Range> ranges;
    for (RawEntry& e : entries) {
      const std::string& name = e.name;
      const auto dtype = detail::parse_dtype(e.dtype);
      if (!dtype) {
        if (detail::is_unsupported_dtype(e.dtype))
          fail(SafetensorsErrc::unsupported_dtype, name,
               "dtype " + e.dtype + " is not supported (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL are)");
        fail(SafetensorsErrc::invalid_header_deserialization, name,
             "dtype \"" + e.dtype + "\" is not a safetensors dtype");
      }
      TensorView t;
      t.name = name;
      t.dtype = *dtype;
      // Element count and bytes, each checked to stay below 2^63.
      std::uint64_t numel = 1;
      for (const std::uint64_t dim : e.shape) {
        if (dim != 0 && numel > (k_max_dim - 1) / dim)
          fail(SafetensorsErrc::validation_overflow, name, "the element count of its shape overflows");
        numel *= dim;
        t.shape.push_back(static_cast<std::int64_t>(dim));
      }
      const std::uint64_t es = dtype_size(*dtype);
      if (numel > (k_max_dim - 1) / es)
        fail(SafetensorsErrc::validation_overflow, name, "the byte size of its shape overflows");
      const std::uint64_t begin = e.offsets[0], end = e.offsets[1];
      ranges.push_back({begin, end, tensors_.size()});
      tensors_.push_back(std::move(t));
      if (end >= begin && end - begin != numel * es)
        fail(SafetensorsErrc::tensor_invalid_info, name,
             "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] hold " +
                 std::to_string(end - begin) + " bytes, shape × dtype needs " + std::to_string(numel * es));
    }
    // Contiguous from 0, no gap, no overlap (the reference sorts by offsets).
    std::sort(ranges.begin(), ranges.end(),
              [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
    std::uint64_t at = 0;
    for (const Range& r : ranges) {
      const std::string& name = tensors_[r.index].name;
      if (r.begin != at || r.end < r.begin)
        fail(SafetensorsErrc::invalid_offset, name,
             "data_offsets [" + std::to_string(r.begin) + ", " + std::to_string(r.end) +
                 "] do not start where the previous tensor ends (" + std::to_string(at) + "): a gap or an overlap");
      at = r.end;
    }
    if (at != data.size())
      fail(SafetensorsErrc::metadata_incomplete_buffer, {},
           "the tensors cover " + std::to_string(at) + " bytes of a data section of " + std::to_string(data.size()) +
               (at < data.size() ? " (trailing bytes)" : " (the file is cut short)"));
    for (const Range& r : ranges) tensors_[r.index].data = data.subspan(r.begin, r.end - r.begin);
    std::sort(tensors_.begin(), tensors_.end(),
              [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
  }

  std::string source_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
  std::shared_ptr<const detail::Mapping> mapping_;  // keeps an opened file mapped
};

/// A tensor to write: its bytes (numel × dtype_size, native little-endian) are copied into the file.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;
};

/// The bytes of a safetensors file holding `tensors` and `metadata` (see the file comment for the order and
/// the alignment). Throws moe::Error naming a tensor whose bytes disagree with its shape, a duplicate or
/// reserved name, or a header over the 100 MB limit.
inline std::vector<std::byte> serialize_safetensors(std::span<const TensorToWrite> tensors,
                                                    const std::map<std::string, std::string>& metadata = {}) {
  std::vector<const TensorToWrite*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const auto sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t at = 0;
  for (const TensorToWrite* t : order) {
    moe::detail::require(t->name != "__metadata__" && !header.contains(t->name),
                         "moe::io::serialize_safetensors: tensor name \"", t->name, "\" is reserved or given twice");
    std::uint64_t numel = 1;
    for (std::int64_t d : t->shape) {
      moe::detail::require(d >= 0, "moe::io::serialize_safetensors: tensor \"", t->name, "\" has a negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    moe::detail::require(numel * dtype_size(t->dtype) == t->data.size(), "moe::io::serialize_safetensors: tensor \"",
                         t->name, "\" has ", t->data.size(), " bytes, its shape and dtype need ",
                         numel * dtype_size(t->dtype));
    header[t->name] = {
        {"dtype", std::string(dtype_name(t->dtype))}, {"shape", t->shape}, {"data_offsets", {at, at + t->data.size()}}};
    at += t->data.size();
  }
  std::string text = header.dump();                   // nlohmann orders object keys: deterministic
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');  // the data section starts 8-byte aligned
  moe::detail::require(text.size() <= SafetensorsLimits{}.max_header_bytes,
                       "moe::io::serialize_safetensors: the header would have ", text.size(),
                       " bytes, over the 100 MB limit");
  std::vector<std::byte> out(8 + text.size() + at);
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::byte* p = out.data() + 8 + text.size();
  for (const TensorToWrite* t : order) {
    if (!t->data.empty()) std::memcpy(p, t->data.data(), t->data.size());
    p += t->data.size();
  }
  return out;
}

/// Writes serialize_safetensors(tensors, metadata) to `path` atomically: a temporary in the same folder, fsync,
/// rename over `path`, fsync of the folder. Throws moe::IoError (an OS call failed; the temporary is removed and
/// an existing file at `path` is unchanged; its message starts with `who`) or moe::Error (see serialize_safetensors).
inline void save_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                             const std::map<std::string, std::string>& metadata = {},
                             const char* who = "moe::io::save_safetensors") {
  const std::vector<std::byte> bytes = serialize_safetensors(tensors, metadata);
  std::filesystem::path tmp = path;
  tmp += ".tmp." + std::to_string(::getpid());
  const auto fail = [&](const char* op, int e) {
    ::unlink(tmp.c_str());
    throw IoError(std::error_code(e, std::generic_category()), path.string(),
                  std::string(who) + ": cannot " + op + " " + path.string());
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("open a temporary next to", errno);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int e = w < 0 ? errno : EIO;
      ::close(fd);
      fail("write", e);
    }
    done += static_cast<std::size_t>(w);
  }
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    fail("flush (fsync)", e);
  }
  if (::close(fd) != 0) fail("close", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename the temporary to", errno);
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);  // the rename itself reaches the disk; a folder that cannot be synced is not an error
    ::close(dfd);
  }
}

}  // namespace moe::io
