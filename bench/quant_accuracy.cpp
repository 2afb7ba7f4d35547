// Accuracy of the weight storage formats against f32 on the bench shapes (issue 15: the 4-bit accuracy
// table). Each layer is the bench's (TopKSoftmax router, SwiGLU bank, init(1): nn.Linear's uniform init) with
// the same canonical weights, so routing is identical and only the expert kernels differ; the error of token
// t is |y_q(t) - y_f32(t)| / |y_f32(t)| over 512 N(0, 1) tokens. Not a timing: no benchmark library.
//   moe_quant_accuracy            prints one markdown row per (shape, storage)

#include <algorithm>
#include <cstdio>

#include <moe/moe.hpp>

#include "presets.hpp"

namespace {

using moe::Index;

template <class Storage>
using Layer = moe::MoELayer<moe::routers::TopKSoftmax<float>,
                            moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, Storage>>;

template <class Storage>
moe::RowMatrix<float> forward(const moe::bench::Preset& p, const moe::RowMatrix<float>& x) {
  Layer<Storage> layer(p.cfg);
  layer.init(1);
  moe::RowMatrix<float> y(x.rows(), x.cols());
  moe::Workspace ws(layer.workspace_bytes(x.rows()));
  layer.forward(x, y, ws);
  return y;
}

template <class Storage>
void report(const moe::bench::Preset& p, const char* name, const moe::RowMatrix<float>& x,
            const moe::RowMatrix<float>& y_f32) {
  const moe::RowMatrix<float> y = forward<Storage>(p, x);
  double worst = 0, sum = 0;
  for (Index t = 0; t < x.rows(); ++t) {
    const double err = (y.row(t) - y_f32.row(t)).cast<double>().norm() / y_f32.row(t).cast<double>().norm();
    worst = std::max(worst, err);
    sum += err;
  }
  std::printf("| %s | %s | %.2e | %.2e |\n", p.name, name, worst, sum / double(x.rows()));
}

}  // namespace

int main() {
  namespace k = moe::kernels;
  std::printf("ISA %s; relative output error per token against f32 storage, 512 tokens\n\n", k::default_arch::name());
  std::printf("| shape | storage | max | mean |\n|---|---|---|---|\n");
  for (const auto& p : moe::bench::k_presets) {
    moe::Rng rng(7);
    moe::RowMatrix<float> x(512, p.cfg.d_model);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
    const moe::RowMatrix<float> y_f32 = forward<k::NativeWeights>(p, x);
    report<k::BF16Weights>(p, "bf16", x, y_f32);
    report<k::Int8Weights>(p, "int8 (per channel)", x, y_f32);
    report<k::Int4Weights<32, k::F16Scales>>(p, "int4 g32 f16 (q4_0)", x, y_f32);
    report<k::Int4Weights<32, k::F32Scales>>(p, "int4 g32 f32", x, y_f32);
    report<k::Int4Weights<64, k::F16Scales>>(p, "int4 g64 f16", x, y_f32);
  }
}
