#pragma once
// What every fuzz target shares: a reader that turns the fuzzer's bytes into shapes, options and floats
// (special values included), and the check that aborts with a message when an oracle fails.
//
// Once the bytes run out the reader continues from a generator seeded with a hash of the whole input, so a
// short input still describes a full-size case and every input stays deterministic.

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace moe::fuzz {

/// Prints "oracle failed: <message>" to stderr and aborts, so libFuzzer (and ctest) see a crash.
[[noreturn]] inline void fail(const std::string& message) {
  std::fprintf(stderr, "moe fuzz oracle failed: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

/// Builds a message from the streamed parts, evaluated only on failure.
#define MOE_FUZZ_CHECK(cond, ...)                                                      \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::ostringstream moe_fuzz_os_;                                                 \
      moe_fuzz_os_ << __FILE__ << ":" << __LINE__ << ": " #cond ": " << __VA_ARGS__;   \
      ::moe::fuzz::fail(moe_fuzz_os_.str());                                           \
    }                                                                                  \
  } while (false)

/// The f32 unit roundoff u = 2^-24.
inline constexpr double k_u32 = 0x1.0p-24;

/// Sequential reader of the fuzzer's bytes.
class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {
    // FNV-1a of the whole input: the generator behind the bytes is a function of the input only.
    std::uint64_t h = 0xcbf29ce484222325ULL;
    for (std::size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 0x100000001b3ULL;
    state_ = h;
  }

  /// The next byte, or a generated one once the input is used up.
  std::uint8_t byte() {
    if (pos_ < size_) return data_[pos_++];
    return static_cast<std::uint8_t>(next() >> 56);
  }
  /// True when every input byte has been read (later values are generated).
  bool exhausted() const { return pos_ >= size_; }

  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | byte();
    return v;
  }
  /// Uniform-ish in [0, n), n >= 1.
  std::int64_t below(std::int64_t n) { return n <= 256 ? byte() % n : static_cast<std::int64_t>(u32() % static_cast<std::uint32_t>(n)); }
  /// Uniform-ish in [lo, hi].
  std::int64_t in(std::int64_t lo, std::int64_t hi) { return lo + below(hi - lo + 1); }
  bool flag() { return (byte() & 1) != 0; }
  /// One of the n entries of a table.
  template <class T, std::size_t N>
  T pick(const T (&table)[N]) {
    return table[below(static_cast<std::int64_t>(N))];
  }

  /// A generated value in [0, 1) (from the hash generator, not from the input): bulk data for large shapes.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// Any float: mostly special values (NaN, ±inf, denormals, ±FLT_MAX, exp overflow points, ties), else
  /// raw bits or a moderate value.
  float special_float() {
    static constexpr float k_table[] = {0.0f,     -0.0f,    1.0f,      -1.0f,     0.5f,     2.0f,     3.0f,
                                        -3.0f,    1e-45f,   -1e-45f,   FLT_MIN,   -FLT_MIN, FLT_MAX,  -FLT_MAX,
                                        1e30f,    -1e30f,   88.8f,     -88.8f,    104.0f,   -104.0f,  1e-20f,
                                        65504.0f, 1e6f,     -1e6f};
    const std::uint8_t c = byte();
    if (c < 24) return k_table[c];
    if (c < 32) return std::numeric_limits<float>::quiet_NaN();
    if (c < 40) return std::numeric_limits<float>::infinity();
    if (c < 48) return -std::numeric_limits<float>::infinity();
    if (c < 64) {
      const std::uint32_t bits = u32();
      float f;
      static_assert(sizeof(f) == sizeof(bits));
      std::memcpy(&f, &bits, sizeof(f));
      return f;
    }
    return moderate_float();
  }

  /// A finite value in about [-4, 4]: small integers (ties), quarters, or an arbitrary fraction.
  float moderate_float() {
    const std::uint8_t c = byte();
    if (c < 96) return static_cast<float>(static_cast<int>(c % 9) - 4);          // exact small integers
    if (c < 160) return static_cast<float>(static_cast<int>(c % 33) - 16) * 0.25f;  // quarters
    return static_cast<float>(8.0 * uniform() - 4.0);
  }

  /// Fills n floats. The first byte picks how: moderate generated values; every value special; moderate
  /// with a few special values at positions from the input; small integers (many ties); all equal.
  void fill(float* v, std::size_t n) {
    const std::uint8_t mode = byte() % 8;
    switch (mode) {
      case 0:
      case 1:
        for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(4.0 * uniform() - 2.0);
        return;
      case 2:
        for (std::size_t i = 0; i < n; ++i) v[i] = special_float();
        return;
      case 3:
      case 4: {
        for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(4.0 * uniform() - 2.0);
        const int injections = 1 + byte() % 4;
        for (int j = 0; j < injections && n > 0; ++j) v[static_cast<std::size_t>(below(static_cast<std::int64_t>(n)))] = special_float();
        return;
      }
      case 5:
        for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<int>(next() % 5) - 2);
        return;
      case 6: {
        const float c = special_float();
        for (std::size_t i = 0; i < n; ++i) v[i] = c;
        return;
      }
      default:
        for (std::size_t i = 0; i < n; ++i) v[i] = moderate_float();
        return;
    }
  }

 private:
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::uint64_t state_ = 0;
};

/// True when every one of the n values is finite.
inline bool all_finite(const float* v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

}  // namespace moe::fuzz
