// MoEConfig validation and the row-major MatrixView (include/moe/config.hpp, moe_config.hpp, error.hpp).

#include <catch2/catch.hpp>
#include <moe/config.hpp>
#include <moe/moe_config.hpp>

using Catch::Matchers::Contains;
using moe::Index;

TEST_CASE("MoEConfig::validate names the first bad field", "[config][error]") {
  const moe::MoEConfig good{.d_model = 4, .d_ff = 8, .n_experts = 3, .top_k = 3};
  REQUIRE_NOTHROW(good.validate());
  REQUIRE(&good.validated() == &good);
  auto bad = good;
  bad.top_k = 4;
  REQUIRE_THROWS_WITH(bad.validate(), "moe::MoEConfig: top_k = 4 exceeds n_experts = 3");
  bad = good;
  bad.n_experts = -2;
  REQUIRE_THROWS_WITH(bad.validate(), Contains("n_experts = -2 must be >= 1"));
  REQUIRE_THROWS_AS(moe::MoEConfig{}.validate(), moe::Error);
}

TEST_CASE("MatrixView views row-major Eigen objects without copying", "[config]") {
  moe::RowMatrix<float> m(4, 6);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(i);
  const moe::MatrixView<float> v(m);
  REQUIRE(v.data() == m.data());
  REQUIRE(v.rows() == 4);
  REQUIRE(v.cols() == 6);
  REQUIRE(v.stride() == 6);
  REQUIRE(v(2, 3) == m(2, 3));

  // A block keeps the parent's row stride.
  const moe::ConstMatrixView<float> b(m.block(1, 2, 3, 2));
  REQUIRE(b.stride() == 6);
  REQUIRE(b(0, 0) == m(1, 2));
  REQUIRE(b(2, 1) == m(3, 3));
  REQUIRE(b.row(1) == &m(2, 2));
  const auto mid = v.middle_rows(1, 2);
  REQUIRE(mid.rows() == 2);
  REQUIRE(mid(0, 0) == m(1, 0));

  // A mutable view converts to a const one.
  const moe::ConstMatrixView<float> c = v;
  REQUIRE(c.data() == m.data());

  // Vectors: a row vector is one token, a column vector is n tokens of width 1.
  Eigen::VectorXf col = Eigen::VectorXf::LinSpaced(5, 0, 4);
  const moe::MatrixView<float> cv(col);
  REQUIRE(cv.rows() == 5);
  REQUIRE(cv.cols() == 1);
  REQUIRE(cv(3, 0) == 3.0f);
}

TEST_CASE("MatrixView rejects impossible shapes", "[config][error]") {
  float data[8] = {};
  REQUIRE_THROWS_WITH(moe::MatrixView<float>(data, -1, 2), Contains("negative shape"));
  REQUIRE_THROWS_WITH(moe::MatrixView<float>(data, 2, 4, 3), Contains("row stride 3 is smaller than cols 4"));
  REQUIRE_THROWS_WITH(moe::MatrixView<float>(nullptr, 2, 2), Contains("null data"));
  REQUIRE_NOTHROW(moe::MatrixView<float>(nullptr, 0, 5));
  // A column of a row-major matrix has a non-unit inner stride: it cannot be a token matrix.
  moe::RowMatrix<float> m(3, 3);
  REQUIRE_THROWS_WITH(moe::MatrixView<float>(m.col(1)), Contains("unit inner stride"));
}
