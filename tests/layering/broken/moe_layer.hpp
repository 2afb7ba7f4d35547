#pragma once
// Fixture: the layer naming a router header (the layer includes no routers/ or experts/ header).
#include "config.hpp"
#include "routers/router.hpp"
