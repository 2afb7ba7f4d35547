// Fuzz target (RELIABILITY F-row of issue 14, S1-S5): moe::io::Safetensors::parse on arbitrary bytes. Every
// input is either rejected with a SafetensorsError or accepted; on every accepted input:
//  - every tensor view lies inside the input, and its size is shape × dtype;
//  - the views tile the data section (sorted by offset: contiguous, from its start to the end of the input);
//  - serialize → parse gives the same tensors (names, dtypes, shapes, bytes) and the same metadata;
//  - read<double>/read<int64_t> of each tensor succeeds (memcpy reads: any alignment).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include <moe/io/safetensors.hpp>

#include "fuzz_support.hpp"

namespace io = moe::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  std::optional<io::Safetensors> parsed;
  try {
    parsed = io::Safetensors::parse(bytes, "fuzz", {.max_header_bytes = 1 << 20, .max_depth = 64, .max_keys = 10000});
  } catch (const io::SafetensorsError&) {
    return 0;
  }
  const io::Safetensors& f = *parsed;
  std::vector<const io::TensorView*> by_offset;
  for (const auto& t : f.tensors()) {
    MOE_FUZZ_CHECK(t.data.data() >= bytes.data() && t.data.data() + t.data.size() <= bytes.data() + bytes.size(),
                   "tensor " << t.name << " lies outside the input");
    MOE_FUZZ_CHECK(t.data.size() == static_cast<std::size_t>(t.numel()) * io::dtype_size(t.dtype),
                   "tensor " << t.name << ": " << t.data.size() << " bytes for " << t.numel() << " elements");
    by_offset.push_back(&t);
    if (io::dtype_size(t.dtype) == 0) continue;
    const bool floating = t.dtype == io::DType::F64 || t.dtype == io::DType::F32 || t.dtype == io::DType::F16 ||
                          t.dtype == io::DType::BF16;
    if (t.numel() > 4096) continue;  // keep each input fast
    if (floating) {
      std::vector<double> out(static_cast<std::size_t>(t.numel()));
      f.read<double>(t.name, out);
    } else {
      std::vector<std::int64_t> out(static_cast<std::size_t>(t.numel()));
      f.read<std::int64_t>(t.name, out);
    }
  }
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const io::TensorView* a, const io::TensorView* b) {
    return a->data.data() != b->data.data() ? a->data.data() < b->data.data() : a->data.size() < b->data.size();
  });
  if (!by_offset.empty()) {
    const std::byte* at = by_offset.front()->data.data();
    for (const auto* t : by_offset) {
      MOE_FUZZ_CHECK(t->data.data() == at, "tensor " << t->name << " leaves a gap or overlaps");
      at += t->data.size();
    }
    MOE_FUZZ_CHECK(at == bytes.data() + bytes.size(), "the tensors do not reach the end of the input");
  }
  // Round trip.
  std::vector<io::TensorToWrite> out;
  for (const auto& t : f.tensors()) out.push_back({t.name, t.dtype, t.shape, t.data});
  const std::vector<std::byte> again = io::serialize_safetensors(out, f.metadata());
  const io::Safetensors g = io::Safetensors::parse(again, "fuzz round trip");
  MOE_FUZZ_CHECK(g.metadata() == f.metadata(), "metadata changed in the round trip");
  MOE_FUZZ_CHECK(g.tensors().size() == f.tensors().size(), "tensor count changed in the round trip");
  for (std::size_t i = 0; i < f.tensors().size(); ++i) {
    const auto &a = f.tensors()[i], &b = g.tensors()[i];
    MOE_FUZZ_CHECK(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.data.size() == b.data.size() &&
                       (a.data.empty() || std::memcmp(a.data.data(), b.data.data(), a.data.size()) == 0),
                   "tensor " << a.name << " changed in the round trip");
  }
  return 0;
}
