#pragma once
/// @file kernels.hpp
/// @brief Module header: the ISA tags and the SIMD kernels (namespace moe::kernels, docs/design.md).
/// Kernels depend on base headers only. The scalar references under kernels/reference/ are for tests.

#include "kernels/arch.hpp"
#include "kernels/simd/activation.hpp"
#include "kernels/simd/bf16_gemm.hpp"
#include "kernels/simd/int4_gemm.hpp"
#include "kernels/simd/int8_gemm.hpp"
#include "kernels/simd/matmul.hpp"
#include "kernels/simd/matmul_nn.hpp"
#include "kernels/simd/panel_gemm.hpp"
#include "kernels/simd/scatter_add.hpp"
#include "kernels/simd/softmax.hpp"
#include "kernels/simd/top_k.hpp"
