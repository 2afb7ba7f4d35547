#pragma once
/// @file version.hpp
/// @brief Version of the moe headers; matches project(moe VERSION ...) in CMakeLists.txt.

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
