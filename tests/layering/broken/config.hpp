#pragma once
// Fixture: a base header.
