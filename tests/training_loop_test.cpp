// train_loop: the same seed gives the same run, a diverged step stops the loop with a clear error, and the
// progress line shows step, loss, aux loss and tokens/s.
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include <moe/training_loop.hpp>

namespace {

// Losses drawn from the loop's Rng: equal vectors mean equal random streams.
std::vector<double> run(std::uint64_t seed, long steps) {
  std::vector<double> losses;
  const auto summary = moe::train_loop({.steps = steps, .seed = seed, .progress = nullptr}, [&](long, moe::Rng& rng) {
    losses.push_back(rng.uniform());
    return moe::StepReport{losses.back(), 0.5 * losses.back(), 8};
  });
  REQUIRE(summary.steps == steps);
  if (steps > 0) CHECK(summary.last.loss == losses.back());
  return losses;
}

std::string read_all(std::FILE* f) {
  std::rewind(f);
  std::string s;
  for (int c; (c = std::fgetc(f)) != EOF;) s.push_back(static_cast<char>(c));
  return s;
}

}  // namespace

TEST_CASE("train_loop: the seed determines the run", "[training_loop]") {
  CHECK(run(7, 20) == run(7, 20));
  CHECK(run(7, 20) != run(8, 20));
  CHECK(run(7, 0).empty());
}

TEST_CASE("train_loop: steps are numbered from 0 and a non-finite loss stops the run", "[training_loop]") {
  std::vector<long> seen;
  const auto diverge = [&](long i, moe::Rng&) {
    seen.push_back(i);
    return moe::StepReport{i == 3 ? std::nan("") : 1.0, 0.0, 1};
  };
  CHECK_THROWS_WITH(moe::train_loop({.steps = 10, .progress = nullptr}, diverge),
                    Catch::Contains("step 3") && Catch::Contains("not finite"));
  CHECK(seen == std::vector<long>{0, 1, 2, 3});
  CHECK_THROWS_WITH(moe::train_loop({.steps = -1, .progress = nullptr}, diverge), Catch::Contains("steps = -1"));
}

TEST_CASE("train_loop: the progress line shows label, step, loss, aux loss and tokens/s", "[training_loop]") {
  std::FILE* f = std::tmpfile();
  REQUIRE(f != nullptr);
  moe::train_loop({.steps = 3, .label = "demo", .progress = f},
                  [](long i, moe::Rng&) { return moe::StepReport{0.25 * double(i + 1), 0.125, 100}; });
  const std::string out = read_all(f);
  std::fclose(f);
  CHECK_THAT(out, Catch::Contains("demo  step 3/3  loss 0.75  aux 0.125"));
  CHECK_THAT(out, Catch::Contains("tokens/s"));
  CHECK(out.back() == '\n');
}
