// Checkpoint errors have two kinds and nothing else escapes: a failing OS call (open, read, write, rename)
// throws moe::IoError (a std::system_error with the OS error code and the path); bad file content throws
// moe::Error naming the file and the field. The model is untouched after every failed load, and a failed
// save leaves the file it would have replaced as it was.

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>

using Catch::Matchers::Contains;
namespace fs = std::filesystem;

static_assert(std::is_base_of_v<std::system_error, moe::IoError>, "IoError carries an error code");
static_assert(!std::is_base_of_v<moe::Error, moe::IoError>, "an I/O failure is not a bad argument");

namespace {

// A fresh, empty directory of its own under the temporary directory.
fs::path scratch_dir() {
  const fs::path dir = fs::temp_directory_path() / "moe_bad_input_io_errors_test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

moe::MixtralMoE make(std::uint64_t seed) {
  moe::MixtralMoE layer({.d_model = 6, .d_ff = 5, .n_experts = 3, .top_k = 2});
  layer.init(seed);
  return layer;
}

std::vector<float> flatten(moe::MixtralMoE& m) {
  std::vector<float> all;
  m.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    const float* v = std::as_const(p).data();
    all.insert(all.end(), v, v + p.rows() * p.cols());
  });
  return all;
}

std::vector<char> read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
void write_all(const fs::path& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Runs f, which must throw moe::IoError; returns it.
template <class F>
moe::IoError io_error_of(F&& f) {
  try {
    f();
  } catch (const moe::IoError& e) {
    return e;
  } catch (const std::exception& e) {
    FAIL("expected moe::IoError, got another exception: " << e.what());
  }
  FAIL("expected moe::IoError, nothing was thrown");
  throw;  // not reached
}

}  // namespace

TEST_CASE("load_checkpoint: OS failures are moe::IoError with the path and the errno", "[bad_input][io]") {
  const fs::path dir = scratch_dir();
  auto model = make(1);
  const auto before = flatten(model);

  SECTION("a directory") {
    const std::string path = (dir / "a_directory").string();
    fs::create_directory(path);
    const moe::IoError e = io_error_of([&] { moe::io::load_checkpoint(model, path); });
    INFO(e.what());
    CHECK(e.code() == std::errc::is_a_directory);
    CHECK(e.path() == path);
    CHECK_THAT(e.what(), Contains(path) && Contains("load_checkpoint"));
  }
  SECTION("a file that does not exist") {
    const std::string path = (dir / "missing.ckpt").string();
    const moe::IoError e = io_error_of([&] { moe::io::load_checkpoint(model, path); });
    INFO(e.what());
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    CHECK(e.path() == path);
    CHECK_THAT(e.what(), Contains(path) && Contains("open") && Contains("No such file or directory"));
  }
  SECTION("a path through a regular file") {
    const fs::path file = dir / "plain";
    write_all(file, {'x'});
    const std::string path = (file / "x.ckpt").string();
    const moe::IoError e = io_error_of([&] { moe::io::load_checkpoint(model, path); });
    INFO(e.what());
    CHECK(e.code() == std::errc::not_a_directory);
    CHECK_THAT(e.what(), Contains(path));
  }
  CHECK(flatten(model) == before);
  fs::remove_all(dir);
}

TEST_CASE("save_checkpoint: OS failures are moe::IoError; the previous file survives", "[bad_input][io]") {
  const fs::path dir = scratch_dir();
  auto model = make(1);

  SECTION("into a directory that does not exist") {
    const std::string path = (dir / "no_such_dir" / "m.ckpt").string();
    const moe::IoError e = io_error_of([&] { moe::io::save_checkpoint(model, path); });
    INFO(e.what());
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    CHECK(e.path() == path);
    CHECK_THAT(e.what(), Contains(path) && Contains("save_checkpoint") && Contains("open"));
    CHECK(!fs::exists(dir / "no_such_dir"));
  }
  SECTION("onto a directory: nothing replaced, no temporary left behind") {
    const fs::path target = dir / "taken";
    fs::create_directory(target);
    write_all(target / "inside", {'k', 'e', 'e', 'p'});
    const moe::IoError e = io_error_of([&] { moe::io::save_checkpoint(model, target.string()); });
    INFO(e.what());
    CHECK(e.code() == std::errc::is_a_directory);
    CHECK(e.path() == target.string());
    CHECK_THAT(e.what(), Contains(target.string()));
    CHECK(fs::is_directory(target));
    CHECK(read_all(target / "inside") == std::vector<char>{'k', 'e', 'e', 'p'});
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& entry : fs::directory_iterator(dir)) ++entries;
    CHECK(entries == 1);  // only `taken`
  }
  fs::remove_all(dir);
}

TEST_CASE("load_checkpoint: bad content is moe::Error naming the file and the field", "[bad_input][io]") {
  const fs::path dir = scratch_dir();
  const std::string good = (dir / "good.ckpt").string(), bad = (dir / "bad.ckpt").string();
  auto saved = make(1);
  moe::io::save_checkpoint(saved, good);
  const auto bytes = read_all(good);
  auto model = make(2);
  const auto before = flatten(model);
  REQUIRE(flatten(saved) != before);

  const auto expect_error = [&](const std::vector<char>& content, const std::string& field) {
    write_all(bad, content);
    INFO("expected a moe::Error about " << field);
    try {
      moe::io::load_checkpoint(model, bad);
      FAIL("nothing was thrown");
    } catch (const moe::IoError& e) {
      FAIL("content error reported as moe::IoError: " << e.what());
    } catch (const moe::Error& e) {
      CHECK_THAT(e.what(), Contains(bad) && Contains(field));
    }
    CHECK(flatten(model) == before);
  };
  expect_error({}, "fewer than the 8 of the header length");
  expect_error(std::vector<char>(bytes.begin(), bytes.begin() + 30), "runs past the end of the file");
  expect_error(std::vector<char>(bytes.begin(), bytes.end() - 1), "cut short");
  auto length = bytes;
  length[3] = '?';
  expect_error(length, "header length");
  auto longer = bytes;
  longer.push_back('\0');
  expect_error(longer, "trailing bytes");
  auto renamed = bytes;
  const std::string name = "\"router.gate\"";
  const auto at = std::search(renamed.begin(), renamed.end(), name.begin(), name.end());
  REQUIRE(at != renamed.end());
  at[2] ^= 1;  // a letter of "router.gate" in the header: the file parses, the model's tensor is missing
  expect_error(renamed, "no tensor \"router.gate\"");

  // Another shape and another scalar type: the field is the tensor's name.
  moe::MixtralMoE wider({.d_model = 6, .d_ff = 7, .n_experts = 3, .top_k = 2});
  moe::io::save_checkpoint(wider, bad);
  try {
    moe::io::load_checkpoint(model, bad);
    FAIL("nothing was thrown");
  } catch (const moe::Error& e) {
    CHECK_THAT(e.what(), Contains(bad) && Contains("bank0.w1 is (21, 6) in the file, (15, 6) in the model"));
  }
  moe::MixtralMoEType<double> as_double({.d_model = 6, .d_ff = 5, .n_experts = 3, .top_k = 2});
  moe::io::save_checkpoint(as_double, bad);
  try {
    moe::io::load_checkpoint(model, bad);
    FAIL("nothing was thrown");
  } catch (const moe::Error& e) {
    CHECK_THAT(e.what(), Contains(bad) && Contains("router.gate has 8-byte elements in the file, 4"));
  }
  CHECK(flatten(model) == before);

  // And the good file still loads.
  moe::io::load_checkpoint(model, good);
  CHECK(flatten(model) == flatten(saved));
  fs::remove_all(dir);
}
