// losses::ZLoss: the value against a direct double formula, its gradient against central finite differences,
// stability for large logits, and no gradient on p.

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/losses/z_loss.hpp>

#include "support/balance.hpp"
#include "support/gradcheck.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::ZLoss;

TEST_CASE("ZLoss: value, finite-difference gradient w.r.t. the logits, and large logits", "[loss][grad]") {
  moe::test::Rng rng(4);
  moe::test::OwnedBatch b(6, 5, 1);
  b.z = moe::test::normal_vector<double>(rng, 30, 3.0);
  b.softmax_from_logits();
  b.cols.assign(6, 0);
  std::vector<double> dp, dz;
  const double value = moe::test::evaluate(ZLoss{.coeff = 1e-3}, b, dp, dz);
  double expected = 0;
  for (Index t = 0; t < 6; ++t) {
    double s = 0;
    for (Index c = 0; c < 5; ++c) s += std::exp(b.z[static_cast<std::size_t>(t * 5 + c)]);
    expected += std::log(s) * std::log(s);
  }
  CHECK(value == Approx(1e-3 * expected / 6.0).epsilon(1e-13));
  for (double g : dp) CHECK(g == 0.0);

  const std::vector<double> analytic = dz;
  std::vector<double> scratch_p, scratch_z;
  moe::test::check_gradient("z", b.z, analytic.data(), 30, [&] {
    return moe::test::evaluate(ZLoss{.coeff = 1e-3}, b, scratch_p, scratch_z);
  });

  // logsumexp stays finite where exp overflows.
  b.z.assign(30, 800.0);
  const double big = moe::test::evaluate(ZLoss{.coeff = 1.0}, b, dp, dz);
  CHECK(big == Approx(std::pow(800.0 + std::log(5.0), 2)).epsilon(1e-12));
  CHECK(std::isfinite(dz[0]));
}
