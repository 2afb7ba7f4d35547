#pragma once
// Fixture: a router that includes an expert bank (routers and experts never include each other).
#include "../config.hpp"
#include "../experts/bank.hpp"
