// io/safetensors.hpp: round trips for every dtype, and RELIABILITY.md S1-S5 (the reference's reject list, its
// accept list, our stricter rules, every prefix and header-byte corruption of a valid file, hostile headers).

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/io/safetensors.hpp>

namespace io = moe::io;
using io::SafetensorsErrc;

namespace {

// A file from a header text and a data section (the length prefix computed), bytes as given.
std::vector<std::byte> file_of(const std::string& header, std::size_t data_bytes = 0, std::uint64_t claimed = 0) {
  const std::uint64_t n = claimed != 0 ? claimed : header.size();
  std::vector<std::byte> f(8 + header.size() + data_bytes, std::byte{0x5A});
  for (int i = 0; i < 8; ++i) f[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  std::memcpy(f.data() + 8, header.data(), header.size());
  return f;
}

// The code of the SafetensorsError that parsing `f` throws; fails the test when it parses.
SafetensorsErrc rejected(const std::vector<std::byte>& f, const io::SafetensorsLimits& limits = {}) {
  try {
    io::Safetensors::parse(f, "test.safetensors", limits);
  } catch (const io::SafetensorsError& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("test.safetensors") != std::string::npos);  // errors name the file
    return e.code();
  }
  FAIL("the file was accepted");
  return SafetensorsErrc::tensor_not_found;
}

std::string tensor_json(const std::string& name, const char* dtype, const std::string& shape, std::uint64_t begin,
                        std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// The reference's aliasing attack: n F32[4] tensors all on the same 16 bytes.
std::string aliased_header(int n) {
  std::string h = "{";
  for (int i = 0; i < n; ++i) {
    if (i > 0) h += ',';
    std::string name = "t";  // not "t" + to_string(i): GCC 12's -Wrestrict false positive (PR 105329)
    name += std::to_string(i);
    h += tensor_json(name, "F32", "[4]", 0, 16);
  }
  return h + "}";
}

template <class T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

// A valid three-tensor file of about 4 KB (f32, bf16, i8), with metadata.
std::vector<std::byte> three_tensor_file() {
  static const std::vector<float> a = [] {
    std::vector<float> v(768);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.25f - 3.0f;
    return v;
  }();
  static const std::vector<std::uint16_t> b(256, 0x3F80);  // bf16 1.0
  static const std::vector<std::int8_t> c = {1, -2, 3, -4, 5, -6, 7, -8};
  const io::TensorToWrite t[] = {{"model.layers.0.mlp.gate.weight", io::DType::F32, {24, 32}, bytes_of(a)},
                                 {"model.layers.0.mlp.experts.0.w1.weight", io::DType::BF16, {16, 16}, bytes_of(b)},
                                 {"scales", io::DType::I8, {8}, bytes_of(c)}};
  return io::serialize_safetensors(t, {{"format", "pt"}});
}

}  // namespace

TEST_CASE("safetensors round trip: every dtype, zero-size and 0-rank tensors, metadata; the writer's layout", "[io]") {
  const std::vector<double> f64 = {1.5, -2.25, 3e100};
  const std::vector<float> f32 = {1.0f, -0.5f, 7.25f, 1e-30f};
  const std::vector<std::uint16_t> f16 = {0x3C00, 0xC000, 0x0001, 0x7BFF};  // 1, -2, 2^-24, 65504
  const std::vector<std::uint16_t> bf16 = {0x3F80, 0xC040, 0x0000};         // 1, -3, 0
  const std::vector<std::int64_t> i64 = {-(std::int64_t{1} << 62), 42};
  const std::vector<std::int8_t> i8 = {-128, 0, 127};
  const std::vector<std::uint8_t> u8 = {0, 255};
  const std::vector<float> none, nine = {9.5f};
  const io::TensorToWrite t[] = {
      {"f32", io::DType::F32, {2, 2}, bytes_of(f32)},    {"u8", io::DType::U8, {2}, bytes_of(u8)},
      {"f64", io::DType::F64, {3}, bytes_of(f64)},       {"f16", io::DType::F16, {4}, bytes_of(f16)},
      {"bf16", io::DType::BF16, {1, 3}, bytes_of(bf16)}, {"i64", io::DType::I64, {2}, bytes_of(i64)},
      {"i8", io::DType::I8, {3}, bytes_of(i8)},          {"empty", io::DType::F32, {2, 0}, bytes_of(none)},
      {"scalar", io::DType::F32, {}, bytes_of(nine)}};
  const auto bytes = io::serialize_safetensors(t, {{"format", "pt"}, {"step", "12"}});
  const auto f = io::Safetensors::parse(bytes);
  REQUIRE(f.tensors().size() == 9);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"step", "12"}});
  for (const auto& w : t) {
    INFO(w.name);
    const io::TensorView& r = f.tensor(w.name);
    CHECK(r.dtype == w.dtype);
    CHECK(r.shape == w.shape);
    REQUIRE(r.data.size() == w.data.size());
    CHECK((w.data.empty() || std::memcmp(r.data.data(), w.data.data(), w.data.size()) == 0));
    // The writer's layout: each offset a multiple of the element size, from an 8-byte-aligned data section.
    CHECK((r.data.data() - bytes.data()) % static_cast<std::ptrdiff_t>(io::dtype_size(r.dtype)) == 0);
  }
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
  CHECK((8 + n) % 8 == 0);
  // Deterministic: the same tensors in another order give the same bytes.
  const io::TensorToWrite reversed[] = {t[8], t[7], t[6], t[5], t[4], t[3], t[2], t[1], t[0]};
  CHECK(io::serialize_safetensors(reversed, {{"step", "12"}, {"format", "pt"}}) == bytes);
  // Conversions.
  std::vector<double> d(4);
  f.read<double>("f16", d);
  CHECK(d == std::vector<double>{1.0, -2.0, std::ldexp(1.0, -24), 65504.0});
  std::vector<float> b(3);
  f.read<float>("bf16", b);
  CHECK(b == std::vector<float>{1.0f, -3.0f, 0.0f});
  std::vector<std::int64_t> ints(3);
  f.read<std::int64_t>("i8", ints);
  CHECK(ints == std::vector<std::int64_t>{-128, 0, 127});
  std::vector<double> wide(3);
  f.read<double>("f64", wide);
  CHECK(wide == f64);
  std::vector<float> scalar(1);
  f.read<float>("scalar", scalar);
  CHECK(scalar[0] == 9.5f);
  std::vector<float> wrong(5);
  try {
    f.read<float>("f32", wrong);
    FAIL("a wrong destination size was accepted");
  } catch (const io::SafetensorsError& e) {
    CHECK(e.code() == SafetensorsErrc::shape_mismatch);
    CHECK(std::string(e.what()).find("\"f32\"") != std::string::npos);
  }
  std::vector<std::int8_t> narrow(2);
  CHECK_THROWS_AS(f.read<std::int8_t>("u8", narrow), io::SafetensorsError);  // 255 does not fit
  CHECK_THROWS_AS(f.read<float>("i8", b), io::SafetensorsError);             // integers do not become floats
  try {
    f.tensor("missing");
    FAIL("a missing tensor was found");
  } catch (const io::SafetensorsError& e) {
    CHECK(e.code() == SafetensorsErrc::tensor_not_found);
  }
  // The writer refuses bytes that disagree with the shape (the reference's InvalidTensorView, case 14) and
  // names given twice.
  const io::TensorToWrite bad[] = {{"x", io::DType::F32, {3}, bytes_of(f32)}};
  CHECK_THROWS_WITH(io::serialize_safetensors(bad), Catch::Contains("\"x\" has 16 bytes"));
  const io::TensorToWrite twice[] = {t[0], t[0]};
  CHECK_THROWS_WITH(io::serialize_safetensors(twice), Catch::Contains("given twice"));
}

TEST_CASE("safetensors files on disk: mapped read-only, written atomically, OS errors as moe::IoError", "[io]") {
  const auto dir = std::filesystem::temp_directory_path() / ("moe_safetensors_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "model.safetensors";
  const std::vector<float> w = {1, 2, 3, 4, 5, 6};
  const io::TensorToWrite t[] = {{"w", io::DType::F32, {2, 3}, bytes_of(w)}};
  io::save_safetensors(path, t, {{"format", "pt"}});
  io::save_safetensors(path, t, {{"format", "pt"}});  // over an existing file
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    CHECK(entry.path().filename() == "model.safetensors");  // no temporary left behind
  {
    const auto f = io::Safetensors::open(path);
    std::vector<float> r(6);
    f.read<float>("w", r);
    CHECK(r == w);
    const auto copy = f;  // copies share the mapping
    CHECK(copy.tensor("w").data.data() == f.tensor("w").data.data());
  }
  try {
    io::Safetensors::open(dir / "missing.safetensors");
    FAIL("a missing file opened");
  } catch (const moe::IoError& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
  }
  try {
    io::Safetensors::open(dir);
    FAIL("a folder opened");
  } catch (const moe::IoError& e) {
    CHECK(e.code() == std::errc::is_a_directory);
  }
  try {
    io::save_safetensors(dir / "no_such_folder" / "x.safetensors", t);
    FAIL("a save into a missing folder succeeded");
  } catch (const moe::IoError& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("S1: the reference's reject list, each with its error", "[io][reliability]") {
  const std::string ok = "{" + tensor_json("t", "F32", "[2,2]", 0, 16) + "}";
  // 1: fewer than 8 bytes.
  CHECK(rejected({}) == SafetensorsErrc::header_too_small);
  CHECK(rejected(std::vector<std::byte>(7)) == SafetensorsErrc::header_too_small);
  // 2: N over the 100 MB limit (and N with 0xff high bytes).
  CHECK(rejected(file_of(ok, 16, 100'000'001)) == SafetensorsErrc::header_too_large);
  CHECK(rejected(file_of(ok, 16, ~std::uint64_t{0})) == SafetensorsErrc::header_too_large);
  // 3: the header runs past the end (N = 60, only the 8 length bytes).
  CHECK(rejected(file_of("", 0, 60)) == SafetensorsErrc::invalid_header_length);
  // 4: not UTF-8.
  CHECK(rejected(file_of("{\"\xff\":1}")) == SafetensorsErrc::invalid_header_utf8);
  CHECK(rejected(file_of("{\"\xc0\xaf\":1}")) == SafetensorsErrc::invalid_header_utf8);  // overlong '/'
  // 5: not JSON, or the wrong schema.
  CHECK(rejected(file_of("{\"t\":")) == SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("[]")) == SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[\"2\"]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8)) ==
        SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("{\"__metadata__\":{\"a\":1}}")) == SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("{" + tensor_json("t", "F12", "[2]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::invalid_header_deserialization);
  // 6: a gap, an overlap, end < begin; the reference's attack: 10 tensors on the same 16 bytes.
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[2]", 8, 16) + "}", 16)) == SafetensorsErrc::invalid_offset);
  CHECK(rejected(file_of(
            "{" + tensor_json("a", "F32", "[4]", 0, 16) + "," + tensor_json("b", "F32", "[2]", 8, 16) + "}", 16)) ==
        SafetensorsErrc::invalid_offset);
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[2]", 16, 8) + "}", 16)) == SafetensorsErrc::invalid_offset);
  CHECK(rejected(file_of(aliased_header(10), 16)) == SafetensorsErrc::invalid_offset);
  // 7, 8: element count or byte size overflows ([2, 2^63 - 1] is below 2^63 per dimension).
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[2,9223372036854775807]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::validation_overflow);
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[4611686018427387904]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::validation_overflow);
  // 9: sub-byte dtypes are not ours: refused by name.
  CHECK(rejected(file_of("{" + tensor_json("t", "F4", "[3]", 0, 2) + "}", 2)) == SafetensorsErrc::unsupported_dtype);
  // 10: end - begin differs from shape x dtype ([2,2] I32 with [0,4]).
  CHECK(rejected(file_of("{" + tensor_json("t", "I32", "[2,2]", 0, 4) + "}", 4)) ==
        SafetensorsErrc::tensor_invalid_info);
  // 11: trailing bytes (a polyglot) and missing bytes (truncated).
  CHECK(rejected(file_of(ok, 17)) == SafetensorsErrc::metadata_incomplete_buffer);
  CHECK(rejected(file_of(ok, 15)) == SafetensorsErrc::metadata_incomplete_buffer);
}

TEST_CASE("S2: what the reference accepts, we accept, with byte-exact views", "[io][reliability]") {
  const std::string t = tensor_json("t", "F32", "[2]", 0, 8);
  for (const std::string& header : {"{" + t + "}   ", "  \n{" + t + "}", "\t{ " + t + " }\r\n"}) {
    const auto f = file_of(header, 8);
    const auto parsed = io::Safetensors::parse(f);
    REQUIRE(parsed.tensors().size() == 1);
    CHECK(parsed.tensor("t").data.data() == f.data() + 8 + header.size());
  }
  CHECK(io::Safetensors::parse(file_of("{}")).tensors().empty());
  const auto zero = io::Safetensors::parse(file_of("{" + tensor_json("z", "F32", "[2,0]", 0, 0) + "}"));
  CHECK(zero.tensor("z").numel() == 0);
  const auto scalar = io::Safetensors::parse(file_of("{" + tensor_json("s", "F64", "[]", 0, 8) + "}", 8));
  CHECK(scalar.tensor("s").numel() == 1);
  // Any key order (the reference sorts by offsets); two zero-size tensors at one offset; unknown fields ignored.
  const auto order = io::Safetensors::parse(
      file_of("{" + tensor_json("b", "F32", "[1]", 4, 8) + "," + tensor_json("e", "U8", "[0]", 4, 4) + "," +
                  tensor_json("f", "U8", "[0]", 4, 4) + ",\"__metadata__\":{\"k\":\"v\"}," +
                  "\"a\":{\"data_offsets\":[0,4],\"shape\":[1],\"dtype\":\"F32\",\"extra\":[1,2]}}",
              8));
  CHECK(order.tensor("a").data.data() + 4 == order.tensor("b").data.data());
  CHECK(order.metadata().at("k") == "v");
}

TEST_CASE("S3: stricter than the reference: duplicates, limits, numbers, dtypes, non-finite values, alignment",
          "[io][reliability]") {
  const std::string t = tensor_json("t", "F32", "[2]", 0, 8);
  CHECK(rejected(file_of("{" + t + "," + t + "}", 8)) == SafetensorsErrc::duplicate_key);
  CHECK(rejected(file_of("{\"t\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8)) ==
        SafetensorsErrc::duplicate_key);
  CHECK(rejected(file_of("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}")) == SafetensorsErrc::duplicate_key);
  // Nesting: 64 levels parse (inside an ignored field), 65 do not.
  const auto nested = [&](int depth) {
    return "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":" + std::string(depth - 2, '[') +
           std::string(depth - 2, ']') + "}}";
  };
  CHECK_NOTHROW(io::Safetensors::parse(file_of(nested(64), 8)));
  CHECK(rejected(file_of(nested(66), 8)) == SafetensorsErrc::limit_exceeded);
  std::string many = "{\"__metadata__\":{";
  for (int i = 0; i < 1001; ++i) {
    if (i > 0) many += ',';
    many += '"';
    many += std::to_string(i);
    many += "\":\"v\"";
  }
  CHECK(rejected(file_of(many + "}}"), {.max_keys = 1000}) == SafetensorsErrc::limit_exceeded);
  // Numbers: negative, fractional, exponent, 2^63, beyond 2^64, a huge exponent.
  for (const char* shape : {"[-2]", "[2.0]", "[2e0]", "[1e400]", "[18446744073709551616]"}) {
    INFO(shape);
    CHECK(rejected(file_of("{" + tensor_json("t", "F32", shape, 0, 8) + "}", 8)) ==
          SafetensorsErrc::invalid_header_deserialization);
  }
  CHECK(rejected(file_of("{" + tensor_json("t", "F32", "[9223372036854775808]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::validation_overflow);
  CHECK(rejected(file_of("{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,-8]}}", 8)) ==
        SafetensorsErrc::invalid_header_deserialization);
  CHECK(rejected(file_of("{" + tensor_json("t", "F8_E4M3", "[8]", 0, 8) + "}", 8)) ==
        SafetensorsErrc::unsupported_dtype);
  // NaN and inf: found with check_finite, named by tensor and element.
  const std::vector<float> values = {1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f};
  const io::TensorToWrite w[] = {{"layers.0.w", io::DType::F32, {3}, bytes_of(values)}};
  const auto bytes = io::serialize_safetensors(w);
  const auto f = io::Safetensors::parse(bytes);
  std::vector<float> out(3);
  CHECK_NOTHROW(f.read<float>("layers.0.w", out));
  try {
    f.read<float>("layers.0.w", out, /*check_finite=*/true);
    FAIL("a NaN passed the finite check");
  } catch (const io::SafetensorsError& e) {
    CHECK(e.code() == SafetensorsErrc::non_finite);
    CHECK_THAT(e.what(), Catch::Contains("\"layers.0.w\"") && Catch::Contains("element 1"));
  }
  // An F32 tensor at an odd offset (after one byte): read by memcpy, never dereferenced misaligned (UBSan).
  std::vector<std::byte> odd =
      file_of("{" + tensor_json("b", "U8", "[1]", 0, 1) + "," + tensor_json("f", "F32", "[2]", 1, 9) + "}", 9);
  const float pair[2] = {3.5f, -1.25f};
  std::memcpy(odd.data() + odd.size() - 8, pair, 8);
  std::vector<double> r(2);
  io::Safetensors::parse(odd).read<double>("f", r);
  CHECK(r == std::vector<double>{3.5, -1.25});
}

TEST_CASE("S4: every prefix of a valid file is rejected; every header-byte corruption is rejected or parses cleanly",
          "[io][reliability]") {
  const auto good = three_tensor_file();
  REQUIRE(good.size() > 3000);
  REQUIRE_NOTHROW(io::Safetensors::parse(good));
  std::size_t prefixes = 0;
  for (std::size_t n = 0; n < good.size(); ++n) {
    const std::vector<std::byte> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    const SafetensorsErrc code = rejected(cut);
    const bool expected = code == SafetensorsErrc::header_too_small || code == SafetensorsErrc::invalid_header_length ||
                          code == SafetensorsErrc::metadata_incomplete_buffer;
    if (!expected) FAIL("prefix " << n << " rejected with code " << static_cast<int>(code));
    ++prefixes;
  }
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<std::uint64_t>(good[static_cast<std::size_t>(i)]);
  std::size_t tried = 0, accepted = 0;
  double slowest = 0;
  for (std::size_t pos = 0; pos < 8 + header; ++pos) {
    std::vector<std::byte> variants;
    variants.push_back(std::byte{0x00});
    variants.push_back(std::byte{0xFF});
    for (int bit = 0; bit < 8; ++bit) variants.push_back(good[pos] ^ static_cast<std::byte>(1 << bit));
    for (const std::byte v : variants) {
      auto bad = good;
      bad[pos] = v;
      const auto start = std::chrono::steady_clock::now();
      try {
        const auto f = io::Safetensors::parse(bad);
        ++accepted;  // e.g. a changed digit of a name, or of padding: then every view is inside the file
        for (const auto& t : f.tensors()) {
          REQUIRE(t.data.data() >= bad.data());
          REQUIRE(t.data.data() + t.data.size() <= bad.data() + bad.size());
          REQUIRE(t.data.size() == static_cast<std::size_t>(t.numel()) * io::dtype_size(t.dtype));
        }
      } catch (const io::SafetensorsError&) {
      }
      slowest = std::max(slowest, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      ++tried;
    }
  }
  // Figures for the record (not a timed assertion).
  std::printf(
      "S4: %zu prefixes, all rejected; %zu header corruptions, %zu parsed cleanly, the rest rejected; "
      "slowest %.2g s\n",
      prefixes, tried, accepted, slowest);
  CHECK(tried == (8 + header) * 10);
}

TEST_CASE("S5: hostile headers are rejected before they cost memory or time", "[io][reliability]") {
  // A header claiming 100 MB (and just below) in a 1 KB file: refused from the length alone.
  const std::vector<std::byte> small = file_of(std::string(1000, ' '));
  auto claim = small;
  for (const std::uint64_t n : {std::uint64_t{100'000'001}, std::uint64_t{99'000'000}}) {
    for (int i = 0; i < 8; ++i) claim[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
    CHECK((rejected(claim) == SafetensorsErrc::header_too_large ||
           rejected(claim) == SafetensorsErrc::invalid_header_length));
  }
  // 100 000 tensors on the same 16 bytes: the aliasing amplifier is an offset error.
  CHECK(rejected(file_of(aliased_header(100'000), 16)) == SafetensorsErrc::invalid_offset);
}
