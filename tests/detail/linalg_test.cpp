// detail/linalg.hpp: accumulating products against plain loops, on shapes across the 64-row chunks.

#include <catch2/catch.hpp>
#include <moe/detail/linalg.hpp>

#include "support/nmse.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;

TEST_CASE("add_matmul_nn and add_matmul_tn accumulate the right products", "[linalg]") {
  moe::test::Rng rng(4);
  for (Index m : {1, 63, 64, 65, 130}) {
    for (Index k : {1, 17}) {
      const Index n = 9;
      const RowMatrix<double> a = moe::test::normal_matrix<double>(rng, m, k);
      const RowMatrix<double> at = moe::test::normal_matrix<double>(rng, k, m);
      const RowMatrix<double> b = moe::test::normal_matrix<double>(rng, k, n);
      const RowMatrix<double> c0 = moe::test::normal_matrix<double>(rng, m, n);
      RowMatrix<double> c = c0, ct = c0;
      moe::detail::add_matmul_nn<double>(a, b, c);
      moe::detail::add_matmul_tn<double>(at, b, ct);
      for (Index i = 0; i < m; ++i) {
        for (Index j = 0; j < n; ++j) {
          double s = c0(i, j), st = c0(i, j);
          for (Index p = 0; p < k; ++p) {
            s += a(i, p) * b(p, j);
            st += at(p, i) * b(p, j);
          }
          INFO("m=" << m << " k=" << k << " (" << i << ", " << j << ")");
          REQUIRE(c(i, j) == Approx(s).epsilon(1e-12).margin(1e-12));
          REQUIRE(ct(i, j) == Approx(st).epsilon(1e-12).margin(1e-12));
        }
      }
    }
  }
}
