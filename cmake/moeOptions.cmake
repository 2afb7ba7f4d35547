# Flags for moe's own tests, benchmarks and examples. Never applied to the public moe target:
# the application decides its instruction set.
add_library(moe_dev_flags INTERFACE)
target_compile_options(moe_dev_flags INTERFACE -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion)
# GCC 12 reports a false -Wmaybe-uninitialized inside its own AVX-512 intrinsics when Eigen's reductions
# (e.g. norm()) are inlined into our code.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_compile_options(moe_dev_flags INTERFACE -Wno-maybe-uninitialized)
endif()
if(MOE_NATIVE)
  target_compile_options(moe_dev_flags INTERFACE -march=native)
endif()
if(MOE_SANITIZE AND MOE_SANITIZE_THREAD)
  message(FATAL_ERROR "MOE_SANITIZE and MOE_SANITIZE_THREAD exclude each other: TSan cannot run beside ASan")
endif()
# RELIABILITY.md Z1. GCC's `undefined` group leaves out float-cast-overflow (a float -> integer conversion out
# of range is UB: the quantizers and the capacity rounding convert); _GLIBCXX_ASSERTIONS bounds-checks
# std::vector/array/span operator[], front/back and the like.
if(MOE_SANITIZE)
  set(_moe_san -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_compile_options(moe_dev_flags INTERFACE ${_moe_san})
  target_compile_definitions(moe_dev_flags INTERFACE _GLIBCXX_ASSERTIONS)
  target_link_options(moe_dev_flags INTERFACE ${_moe_san})
  # With ASan, GCC 12 also reports -Wuninitialized on the `__m512 __Y = __Y;` of its own AVX-512 intrinsics
  # (xsimd's exp, nearbyint, to_int): hundreds of false reports per build.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(moe_dev_flags INTERFACE -Wno-uninitialized)
  endif()
endif()
# RELIABILITY.md Z2 (scripts/test.sh builds it with clang and LLVM's libomp, and runs `ctest -L concurrency`).
if(MOE_SANITIZE_THREAD)
  set(_moe_tsan -fsanitize=thread -fno-omit-frame-pointer)
  target_compile_options(moe_dev_flags INTERFACE ${_moe_tsan})
  target_link_options(moe_dev_flags INTERFACE ${_moe_tsan})
endif()
