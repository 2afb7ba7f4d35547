#pragma once
/// @file error.hpp
/// @brief moe::Error, the one exception type of the library, and the checks that throw it.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

/// Thrown for invalid configuration or input, always before any output is written.
/// The message names the offending field or tensor and the values that were seen.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
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

}  // namespace detail
}  // namespace moe
