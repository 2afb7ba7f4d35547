#pragma once
// Fixture: the routers module header forgets routers/router.hpp (one violation).
