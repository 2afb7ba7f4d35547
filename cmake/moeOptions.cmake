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
if(MOE_SANITIZE)
  set(_moe_san -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_compile_options(moe_dev_flags INTERFACE ${_moe_san})
  target_link_options(moe_dev_flags INTERFACE ${_moe_san})
endif()
if(MOE_SANITIZE AND MOE_SANITIZE_THREAD)
  message(FATAL_ERROR "MOE_SANITIZE and MOE_SANITIZE_THREAD exclude each other: TSan cannot run beside ASan")
endif()
# RELIABILITY.md Z2 (scripts/test.sh builds it with clang and LLVM's libomp, and runs `ctest -L concurrency`).
if(MOE_SANITIZE_THREAD)
  set(_moe_tsan -fsanitize=thread -fno-omit-frame-pointer)
  target_compile_options(moe_dev_flags INTERFACE ${_moe_tsan})
  target_link_options(moe_dev_flags INTERFACE ${_moe_tsan})
endif()
