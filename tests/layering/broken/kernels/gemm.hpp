#pragma once
// Fixture: a kernel that includes a router (kernels may include only base headers).
#include "../config.hpp"
#include "../routers/router.hpp"
