// Loading straight into the storage a bank runs on (docs/models.md, "Memory"): a bf16 checkpoint into
// PackedOnly<BF16Weights> or PackedOnly<Int4Weights<>>, an f32 one into PackedOnly<Int8Weights>, with the heap's peak
// during the load at most 1.25 × the bank's stored size; the same weights loaded into trainable banks give bitwise the
// same outputs. The heap is counted by replacing malloc (tests/support/counting_malloc.hpp), so this is its own
// executable.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/models/hugging_face.hpp>

#include "support/counting_malloc.hpp"

namespace {

using moe::Index;
namespace fs = std::filesystem;
namespace kernels = moe::kernels;
namespace models = moe::models;

constexpr Index d = 256, ff = 512, n_experts = 16;

// A Mixtral-named checkpoint of random weights in `dtype` (F32, or BF16 holding the same values rounded down).
fs::path write_checkpoint(moe::io::DType dtype, const std::string& tag) {
  const fs::path dir = fs::temp_directory_path() / ("moe_load_memory_" + tag);
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512,
    "num_local_experts": 16, "num_experts_per_tok": 2, "num_hidden_layers": 1, "hidden_act": "silu"})";
  moe::Rng rng(7);
  std::vector<std::vector<std::byte>> bytes;
  std::vector<moe::io::TensorToWrite> tensors;
  const auto add = [&](const std::string& name, Index rows, Index cols) {
    std::vector<std::byte> b(static_cast<std::size_t>(rows * cols) * moe::io::dtype_size(dtype));
    for (Index i = 0; i < rows * cols; ++i) {
      const float v = static_cast<float>(rng.normal() * 0.05);
      std::uint32_t bits;
      std::memcpy(&bits, &v, 4);
      if (dtype == moe::io::DType::BF16) {
        const auto top = static_cast<std::uint16_t>(bits >> 16);
        std::memcpy(b.data() + 2 * i, &top, 2);
      } else {
        std::memcpy(b.data() + 4 * i, &v, 4);
      }
    }
    bytes.push_back(std::move(b));
    tensors.push_back({.name = name, .dtype = dtype, .shape = {rows, cols}, .data = bytes.back()});
  };
  bytes.reserve(1 + 3 * n_experts);
  add("model.layers.0.block_sparse_moe.gate.weight", n_experts, d);
  for (Index e = 0; e < n_experts; ++e) {
    const std::string p = "model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".";
    add(p + "w1.weight", ff, d);
    add(p + "w3.weight", ff, d);
    add(p + "w2.weight", d, ff);
  }
  moe::io::save_safetensors(dir / "model.safetensors", tensors);
  return dir;
}

struct Load {
  double peak_ratio = 0;      // heap peak during the load / the bank's stored bytes
  double resident_ratio = 0;  // heap held by the loaded layer / the bank's stored bytes
  std::vector<float> y;       // the layer's output on a fixed batch
};

template <class Storage>
Load load(const fs::path& dir, moe::io::DType stored) {
  const double bank_bytes = double(3 * n_experts * ff * d) * double(moe::io::dtype_size(stored));
  const long long before = moe::test::heap_bytes.load();
  moe::test::reset_heap_peak();
  Load out;
  {
    const auto layer = models::load_hf_moe_layer<float, Storage>(dir, 0);
    out.peak_ratio = double(moe::test::heap_peak.load() - before) / bank_bytes;
    out.resident_ratio = double(moe::test::heap_bytes.load() - before) / bank_bytes;
    moe::Rng rng(3);
    moe::RowMatrix<float> x(64, d), y(64, d);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
    moe::Workspace ws;
    std::visit([&](const auto& l) { l.forward(x, y, ws); }, layer);
    out.y.assign(y.data(), y.data() + y.size());
  }
  return out;
}

}  // namespace

TEST_CASE("A bank loads straight into its packed storage: heap peak <= 1.25 x its stored size",
          "[models][hf][memory]") {
  using BF16 = moe::io::DType;
  const fs::path bf16_dir = write_checkpoint(BF16::BF16, "bf16"), f32_dir = write_checkpoint(BF16::F32, "f32");

  const Load packed_bf16 = load<kernels::PackedOnly<kernels::BF16Weights>>(bf16_dir, BF16::BF16);
  const Load trainable_bf16 = load<kernels::BF16Weights>(bf16_dir, BF16::BF16);
  const Load packed_int8 = load<kernels::PackedOnly<kernels::Int8Weights>>(f32_dir, BF16::F32);
  const Load trainable_int8 = load<kernels::Int8Weights>(f32_dir, BF16::F32);
  const Load packed_int4 = load<kernels::PackedOnly<kernels::Int4Weights<>>>(bf16_dir, BF16::BF16);
  const Load trainable_int4 = load<kernels::Int4Weights<>>(bf16_dir, BF16::BF16);
  const Load packed_f32 = load<kernels::PackedOnly<kernels::NativeWeights>>(f32_dir, BF16::F32);
  const Load native_f32 = load<kernels::NativeWeights>(f32_dir, BF16::F32);

  // The same panels, whether packed from a canonical copy or straight from the file: the same outputs, bit for bit.
  CHECK(packed_bf16.y == trainable_bf16.y);
  CHECK(packed_int8.y == trainable_int8.y);
  CHECK(packed_int4.y == trainable_int4.y);
  CHECK(packed_f32.y == native_f32.y);
  CHECK(packed_bf16.y != packed_int8.y);  // the storages differ, so equal outputs above are not vacuous
  CHECK(packed_int4.y != packed_int8.y);

  if (!MOE_TEST_COUNTS_MALLOC) return;  // sanitizers replace malloc: only the outputs are checked there
  WARN("heap peak / stored bank bytes: bf16 packed-only "
       << packed_bf16.peak_ratio << " (resident " << packed_bf16.resident_ratio << "), bf16 trainable "
       << trainable_bf16.peak_ratio << "; int8 from f32 packed-only " << packed_int8.peak_ratio << ", trainable "
       << trainable_int8.peak_ratio << "; int4 from bf16 packed-only " << packed_int4.peak_ratio << " (resident "
       << packed_int4.resident_ratio << "); f32 packed-only " << packed_f32.peak_ratio << ", f32 trainable "
       << native_f32.peak_ratio);
  CHECK(packed_bf16.peak_ratio <= 1.25);
  CHECK(packed_int8.peak_ratio <= 1.25);
  CHECK(packed_int4.peak_ratio <= 1.25);
  CHECK(packed_f32.peak_ratio <= 1.25);
  CHECK(packed_bf16.resident_ratio >= 0.95);  // the counter sees the panels (a counter that missed them passes nothing)
  // The trainable banks keep an f32 copy beside their panels: the bound is what PackedOnly buys.
  CHECK(trainable_bf16.peak_ratio > 2.5);
  CHECK(native_f32.peak_ratio > 1.9);
}
