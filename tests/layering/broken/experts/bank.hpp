#pragma once
// Fixture: an expert bank that includes a router (routers and experts never include each other).
#include "../config.hpp"
#include "../routers/router.hpp"
