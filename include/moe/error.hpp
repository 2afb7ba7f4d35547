#pragma once
/// @file error.hpp
/// @brief The library's exception types and the checks that throw them: moe::Error for bad configuration or
/// input (file content included), moe::IoError for an operating-system call on a file that failed.

#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace moe {

/// Thrown for invalid configuration or input, always before any output is written.
/// The message names the offending field or tensor and the values that were seen.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown when an operating-system call on a file fails (open, read, write, rename): not bad input but a
/// failure of the environment, so not a moe::Error (catch both, or std::exception). code() is the OS error
/// (errno in std::generic_category(), e.g. std::errc::no_such_file_or_directory, is_a_directory; io_error when
/// the OS gave none); path() is the file; what() names the function, the operation, the path and the OS reason.
class IoError : public std::system_error {
 public:
  /// @param what "<function>: cannot <operation> <path>"; what() appends ": " and the OS reason
  IoError(std::error_code code, const std::string& path, const std::string& what)
      : std::system_error(code, what), path_(std::make_shared<const std::string>(path)) {}
  /// The path the failed call was given (for a save, the destination the caller named).
  const std::string& path() const noexcept { return *path_; }

 private:
  std::shared_ptr<const std::string> path_;  // shared: copying the exception cannot throw
};

namespace detail {

/// Throws moe::Error whose message is the concatenation of `parts` when `ok` is false.
template <class... Parts>
inline void require(bool ok, const Parts&... parts) {
  if (ok) return;
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

/// Where a floating-point option may lie: [lo, hi], each bound closed or open; an infinite bound leaves that
/// side unbounded (the value must still be finite).
struct Interval {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool open_lo = false;  ///< lo itself is outside
  bool open_hi = false;  ///< hi itself is outside

  /// True for a finite value inside.
  bool contains(double v) const {
    return std::isfinite(v) && (open_lo ? v > lo : v >= lo) && (open_hi ? v < hi : v <= hi);
  }
  /// "finite", "finite and > 0", "finite and in [0, 1)", ...
  friend std::ostream& operator<<(std::ostream& os, const Interval& r) {
    os << "finite";
    const bool has_lo = std::isfinite(r.lo), has_hi = std::isfinite(r.hi);
    if (has_lo && has_hi)
      return os << " and in " << (r.open_lo ? "(" : "[") << r.lo << ", " << r.hi << (r.open_hi ? ")" : "]");
    if (has_lo) return os << " and " << (r.open_lo ? "> " : ">= ") << r.lo;
    if (has_hi) return os << " and " << (r.open_hi ? "< " : "<= ") << r.hi;
    return os;
  }
};

/// (0, inf): temperatures, learning rates, scales.
inline constexpr Interval k_positive{0.0, std::numeric_limits<double>::infinity(), true, false};
/// [0, inf): coefficients, rates, weight decay.
inline constexpr Interval k_non_negative{0.0, std::numeric_limits<double>::infinity(), false, false};

/// The one check of a floating-point option: throws moe::Error "<owner>: <field> = <value> must be finite
/// and in <range>" unless `value` is finite and inside `range`.
inline void require_in(double value, const Interval& range, std::string_view owner, std::string_view field) {
  require(range.contains(value), owner, ": ", field, " = ", value, " must be ", range);
}

}  // namespace detail
}  // namespace moe
