#pragma once
/// @file kernels/simd/panel_gemm.hpp
/// @brief y = x wᵀ on weights packed once into column panels: the expert bank's GEMM and multi-row GEMV.
///
/// A weight matrix w (n, k) (nn.Linear layout) is packed into ceil(n / width) panels. Panel j holds `width`
/// output columns as (steps, width, group) elements, steps = ceil(k / group): one step is one aligned load
/// of `width` columns, so the micro-kernel streams each panel front to back exactly once per block of
/// `rows` x-rows. With few rows per expert (decode) one block covers them all and every weight byte is read
/// once (the multi-row GEMV); with many rows the same code is a register-tiled GEMM (rows x width
/// accumulators, one broadcast of x per row and step). The storage kernel (this file: weights in T;
/// bf16_gemm.hpp, int8_gemm.hpp) fixes the element types, `group` and the inner instruction.
///
/// Two source matrices may share each panel (width/2 columns of each): the gate and up projections then
/// run in one pass over the activations and the epilogue sees both halves of a tile.
///
/// Every output element is one sequence of fused multiply-adds over k in increasing order, whatever its
/// row block or thread: results do not depend on the tiling or the thread count.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <xsimd/memory/xsimd_aligned_allocator.hpp>
#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// True for the AVX-512 archs: 32 vector registers (room for a 12-row tile).
template <class Arch>
inline constexpr bool is_avx512 = XSIMD_WITH_AVX512F && std::is_base_of_v<xsimd::avx512f, Arch>;

/// True for the AVX2 archs (xsimd::avx2, fma3<avx2>; not AVX-512): 16 vector registers.
template <class Arch>
inline constexpr bool is_avx2 = XSIMD_WITH_AVX2 && std::is_base_of_v<xsimd::avx2, Arch>;

/// Columns per panel: two registers of 32-bit (or T) lanes; 8 scalar columns for the scalar fallback.
template <class T, class Arch>
constexpr Index panel_width() {
  if constexpr (has_simd<T, Arch>) {
    return 2 * static_cast<Index>(lanes<T, Arch>());
  } else {
    return 8;
  }
}

/// Rows per register tile: rows x 2 accumulators + 2 weight registers + 1 broadcast fit the register file.
template <class T, class Arch>
constexpr int panel_rows() {
  if constexpr (is_avx512<Arch>) {
    return 12;
  } else if constexpr (has_simd<T, Arch>) {
    return 6;
  } else {
    return 4;
  }
}

/// Panel steps the micro-kernels prefetch ahead. With few rows per expert a kernel consumes weights faster
/// than the hardware prefetcher (which stops at each 4 KiB page) brings them in; 64 steps (8 KiB of an
/// AVX-512 panel) measured best on the issue-#6 shapes (S2 f32 T=128, 1 thread: 121 -> 167 GFLOP/s).
inline constexpr Index k_prefetch_steps = 64;

/// Prefetches the cache lines of the panel step k_prefetch_steps after `step` (a hint: past the end of the
/// weights it is harmless).
template <std::size_t StepBytes>
inline void prefetch_step(const void* step) {
  const char* ahead = static_cast<const char*>(step) + k_prefetch_steps * static_cast<Index>(StepBytes);
  for (std::size_t b = 0; b < StepBytes; b += 64) __builtin_prefetch(ahead + b);
}

/// Calls f(std::integral_constant<int, R>) with R == rows, for rows in [1, Max]: one instantiation per
/// edge height, so the row tail runs the same unrolled code as full tiles.
template <int Max, class F>
void dispatch_rows(int rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return dispatch_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

}  // namespace detail

/// Storage kernel for weights kept in T (float or double): fused multiply-add on broadcast x.
template <class T, class Arch>
struct NativePanels {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::NativePanels: T must be float or double");
  using Weight = T;  ///< element of a packed panel
  using Input = T;   ///< element of an activation row
  using Out = T;     ///< element of an output tile
  static constexpr Index width = detail::panel_width<T, Arch>();
  static constexpr int rows = detail::panel_rows<T, Arch>();
  static constexpr Index group = 1;              ///< k elements per step
  static constexpr bool quantized = false;       ///< per-column scales and sums
  static constexpr bool row_scaled = false;      ///< activations carry a per-row scale
  static constexpr bool blocked = false;         ///< the kernel packs its own panels (pack_panel, panel_bytes)

  template <class S>
  static float column_scale(const S*, Index) {
    return 1.0f;
  }
  template <class S>
  static Weight encode(S v, float) {
    return static_cast<Weight>(v);
  }

  /// tile (R, width) = rows xr[0..R) times one panel over `steps` steps.
  template <int R>
  static void run(const Input* const* xr, const float*, const Weight* panel, Index steps, const float*,
                  const std::int32_t*, Out* tile) {
    if constexpr (has_simd<T, Arch>) {
      using B = xsimd::batch<T, Arch>;
      constexpr Index L = static_cast<Index>(B::size);
      B acc[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = B(T(0));
      for (Index q = 0; q < steps; ++q) {
        detail::prefetch_step<width * sizeof(Weight)>(panel + q * width);
        const B b0 = B::load_aligned(panel + q * width), b1 = B::load_aligned(panel + q * width + L);
        for (int r = 0; r < R; ++r) {
          const B a(xr[r][q]);
          acc[r][0] = detail::fmadd(a, b0, acc[r][0]);
          acc[r][1] = detail::fmadd(a, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < R; ++r) {
        acc[r][0].store_aligned(tile + r * width);
        acc[r][1].store_aligned(tile + r * width + L);
      }
    } else {
      T acc[R][width] = {};  // (R, width)
      for (Index q = 0; q < steps; ++q) {
        for (int r = 0; r < R; ++r) {
          for (Index c = 0; c < width; ++c) acc[r][c] = detail::fmadd(xr[r][q], panel[q * width + c], acc[r][c]);
        }
      }
      for (int r = 0; r < R; ++r) std::copy_n(acc[r], width, tile + r * width);
    }
  }
};

/// Weights of n_mats matrices, each (n, k) per source, packed into panels for `Kernel`.
/// With n_src == 2, panel j holds columns [j·h, j·h + h) of source 0 then of source 1 (h = width / 2);
/// columns past n and steps past k are zero.
template <class Kernel>
class PackedWeights {
 public:
  using Weight = typename Kernel::Weight;
  static constexpr Index width = Kernel::width;

  PackedWeights() = default;
  /// @param n_mats matrices (experts); @param n outputs per source; @param k inputs; @param n_src 1 or 2.
  /// Throws moe::Error when the padded panels exceed PTRDIFF_MAX bytes (see elements()).
  PackedWeights(Index n_mats, Index n, Index k, int n_src)
      : n_mats_(n_mats),
        n_(n),
        k_(k),
        n_src_(n_src),
        half_(width / n_src),
        panels_(ceil_div(n, half_)),
        steps_(ceil_div(k, Kernel::group)),
        data_(static_cast<std::size_t>(
            elements("moe::kernels::PackedWeights", "n_mats * panels * steps * width * group", n_mats, n, k, n_src))),
        scales_(Kernel::quantized ? static_cast<std::size_t>(n_mats * panels_ * width) : 0),
        sums_(Kernel::quantized ? static_cast<std::size_t>(n_mats * panels_ * width) : 0) {
    assert(n_src == 1 || n_src == 2);
  }

  /// Elements of the panels of n_mats (n, k) matrices from n_src sources, padded to whole panels and steps:
  /// n_mats * panels * steps * width * group, overflow-checked (moe::Error naming `owner` and `what`).
  static Index elements(const char* owner, const char* what, Index n_mats, Index n, Index k, int n_src) {
    const Index panels = ceil_div(n, width / n_src), steps = ceil_div(k, Kernel::group);
    if constexpr (Kernel::blocked) {
      // A blocked panel's trailer is smaller than a step: steps + 1 bounds it.
      moe::detail::checked_size<Weight>(owner, what, {n_mats, panels, steps + 1, Kernel::step_bytes});
      return n_mats * panels * Kernel::panel_bytes(steps);
    } else {
      return moe::detail::checked_size<Weight>(owner, what, {n_mats, panels, steps, width, Kernel::group});
    }
  }

  Index panels() const { return panels_; }         ///< panels per matrix
  Index steps() const { return steps_; }           ///< steps per panel
  Index padded_k() const { return steps_ * Kernel::group; }  ///< k rounded up to whole steps (input row length)
  Index columns_per_source() const { return half_; }  ///< columns of each source in one panel
  /// Elements per panel.
  Index panel_size() const {
    if constexpr (Kernel::blocked) {
      return Kernel::panel_bytes(steps_);
    } else {
      return steps_ * width * Kernel::group;
    }
  }

  /// Panel j of matrix m: (steps, width, group).
  const Weight* panel(Index m, Index j) const { return data_.data() + (m * panels_ + j) * panel_size(); }
  /// Per-column dequantisation scales of matrix m, (panels, width); quantized kernels only.
  const float* scales(Index m) const { return Kernel::quantized ? scales_.data() + m * panels_ * width : nullptr; }
  /// Per-column sums of the quantized weights of matrix m, (panels, width); quantized kernels only.
  const std::int32_t* sums(Index m) const { return Kernel::quantized ? sums_.data() + m * panels_ * width : nullptr; }

  /// Packs matrix m from n_src sources, each (n, k). No allocation. Runs after every weight update.
  template <class S>
  void pack(Index m, const ConstMatrixView<S>* src) {
    const S* rows[width];  // (width) source row of each panel column, nullptr past n
    float scale[width];    // (width) its scale
    for (Index j = 0; j < panels_; ++j) {
      Weight* dst = data_.data() + (m * panels_ + j) * panel_size();  // (steps, width, group)
      for (Index c = 0; c < width; ++c) {
        const Index s = c / half_, col = j * half_ + c % half_;
        rows[c] = col < n_ ? src[s].row(col) : nullptr;
        if constexpr (!Kernel::blocked) scale[c] = rows[c] != nullptr ? Kernel::column_scale(rows[c], k_) : 0.0f;
      }
      if constexpr (Kernel::blocked) {
        Kernel::pack_panel(rows, k_, steps_, dst);
      } else {
        // Steps outermost: the panel is written front to back, its `width` source rows read side by side;
        // a branch-free loop while every column exists and no step is padded.
        Weight* out = dst;
        const bool all_columns = std::all_of(rows, rows + width, [](const S* r) { return r != nullptr; });
        const Index unpadded = all_columns ? k_ / Kernel::group : 0;
        for (Index q = 0; q < unpadded; ++q) {
          for (Index c = 0; c < width; ++c) {
            for (Index g = 0; g < Kernel::group; ++g) *out++ = Kernel::encode(rows[c][q * Kernel::group + g], scale[c]);
          }
        }
        for (Index q = unpadded; q < steps_; ++q) {
          const bool inside = (q + 1) * Kernel::group <= k_;  // no step padding
          for (Index c = 0; c < width; ++c) {
            for (Index g = 0; g < Kernel::group; ++g) {
              const Index p = q * Kernel::group + g;
              *out++ = rows[c] != nullptr && (inside || p < k_) ? Kernel::encode(rows[c][p], scale[c]) : Weight(0);
            }
          }
        }
        if constexpr (Kernel::quantized) {
          for (Index c = 0; c < width; ++c) {
            std::int32_t sum = 0;
            for (Index q = 0; q < steps_; ++q)
              for (Index g = 0; g < Kernel::group; ++g) sum += dst[(q * width + c) * Kernel::group + g];
            scales_[static_cast<std::size_t>((m * panels_ + j) * width + c)] = scale[c];
            sums_[static_cast<std::size_t>((m * panels_ + j) * width + c)] = sum;
          }
        }
      }
    }
  }

  /// True when matrix m's panels equal what pack() would write from src now (detects stale panels).
  template <class S>
  bool matches(Index m, const ConstMatrixView<S>* src) const {
    if constexpr (Kernel::blocked) {
      PackedWeights fresh(1, n_, k_, n_src_);
      fresh.pack(0, src);
      return std::equal(fresh.data_.begin(), fresh.data_.end(), panel(m, 0));
    } else {
      for (Index j = 0; j < panels_; ++j) {
        const Weight* p = panel(m, j);
        for (Index c = 0; c < width; ++c) {
          const Index s = c / half_, col = j * half_ + c % half_;
          if (col >= n_) continue;
          const float scale = Kernel::column_scale(src[s].row(col), k_);
          for (Index i = 0; i < k_; ++i) {
            const Index q = i / Kernel::group, g = i % Kernel::group;
            if (p[(q * width + c) * Kernel::group + g] != Kernel::encode(src[s](col, i), scale)) return false;
          }
        }
      }
      return true;
    }
  }

 private:
  template <class U>
  using Buffer = std::vector<U, xsimd::aligned_allocator<U, 64>>;
  // ceil(a / b) for a >= 0, b > 0, without forming a + b - 1.
  static constexpr Index ceil_div(Index a, Index b) { return a / b + (a % b != 0 ? 1 : 0); }
  Index n_mats_ = 0, n_ = 0, k_ = 0;
  int n_src_ = 1;
  Index half_ = width, panels_ = 0, steps_ = 0;
  Buffer<Weight> data_;         // (n_mats, panels, steps, width, group), or blocked panels of panel_size()
  Buffer<float> scales_;        // (n_mats, panels, width), quantized kernels only
  Buffer<std::int32_t> sums_;   // (n_mats, panels, width), quantized kernels only
};

/// The activation rows panel_gemm reads: row i at data + idx(i) · stride, idx(i) = index[i] (rows gathered
/// through an index: every routed slot of a token reads the token's one converted row) or i (contiguous);
/// per-row scales scales[idx(i)] for row_scaled kernels (else nullptr).
template <class Input>
struct PanelRows {
  const Input* data = nullptr;
  Index stride = 0;
  const Index* index = nullptr;
  const float* scales = nullptr;

  Index at(Index i) const { return index != nullptr ? index[i] : i; }
  const Input* row(Index i) const { return data + at(i) * stride; }
  float scale(Index i) const { return scales[at(i)]; }
  /// The rows from i0 on.
  PanelRows from(Index i0) const {
    return index != nullptr ? PanelRows{data, stride, index + i0, scales}
                            : PanelRows{data + i0 * stride, stride, nullptr, scales != nullptr ? scales + i0 : nullptr};
  }
};

/// Runs panels [p0, p1) of matrix m over rows [0, n_rows) of x, in register tiles of Kernel::rows rows,
/// and hands each finished tile to `epilogue(row0, rows, panel, tile)`, tile (rows, width) with row stride
/// width. Panels outermost: a work item streams each panel once per row block, and its x rows stay in cache.
/// @param x rows of w.padded_k() activations in Kernel::Input (with per-row scales for row_scaled kernels)
template <class Kernel, class Epilogue>
void panel_gemm(const PackedWeights<Kernel>& w, Index m, Index p0, Index p1, const PanelRows<typename Kernel::Input>& x,
                Index n_rows, Epilogue&& epilogue) {
  using Input = typename Kernel::Input;
  alignas(64) typename Kernel::Out tile[Kernel::rows * Kernel::width];  // (rows, width)
  const Input* xr[Kernel::rows];                                       // (rows) the row block's rows
  float xs[Kernel::rows];                                               // (rows) their scales
  const float* col_scales = w.scales(m);
  const std::int32_t* col_sums = w.sums(m);
  for (Index j = p0; j < p1; ++j) {
    const Index off = j * Kernel::width;
    for (Index r0 = 0; r0 < n_rows; r0 += Kernel::rows) {
      const int rows = static_cast<int>(std::min<Index>(Kernel::rows, n_rows - r0));
      for (int r = 0; r < rows; ++r) {
        xr[r] = x.row(r0 + r);
        if constexpr (Kernel::row_scaled) xs[r] = x.scale(r0 + r);
      }
      detail::dispatch_rows<Kernel::rows>(rows, [&](auto r) {
        Kernel::template run<decltype(r)::value>(xr, Kernel::row_scaled ? xs : nullptr, w.panel(m, j), w.steps(),
                                                 col_scales ? col_scales + off : nullptr,
                                                 col_sums ? col_sums + off : nullptr, tile);
      });
      epilogue(r0, static_cast<Index>(rows), j, static_cast<const typename Kernel::Out*>(tile));
    }
  }
}

/// Weight storage policy: weights stay in the bank's scalar type T (float or double).
struct NativeWeights {
  static constexpr const char* name() { return "native"; }
  template <class T, class Arch>
  using kernel = NativePanels<T, Arch>;
};

/// Weight storage policy wrapper: the weights live only in Storage's packed panels, with no canonical copy in
/// the bank's T. Such a bank is for inference: it has no parameters, gradients or backward, and is filled
/// expert by expert (experts::FFN::pack_expert), e.g. straight from a bf16 checkpoint, so loading needs no
/// f32 copy of the bank.
template <class Storage>
struct PackedOnly {
  static constexpr const char* name() { return Storage::name(); }
  template <class T, class Arch>
  using kernel = typename Storage::template kernel<T, Arch>;
};

/// True for PackedOnly<S> storage.
template <class Storage>
inline constexpr bool is_packed_only = false;
template <class Storage>
inline constexpr bool is_packed_only<PackedOnly<Storage>> = true;

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
