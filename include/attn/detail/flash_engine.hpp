// attn/detail/flash_engine.hpp — forwards to the engine's new home,
// attn/engine/forward.hpp (kept so that existing includes keep working).
#pragma once

#include "attn/engine/forward.hpp"
