// attn/attn.hpp — umbrella header: includes every public header of attn.
#pragma once

#include "attn/attention_weights.hpp"
#include "attn/cross.hpp"
#include "attn/layers/projection.hpp"
#include "attn/linear.hpp"
#include "attn/mask.hpp"
#include "attn/masked.hpp"
#include "attn/multi_head.hpp"
#include "attn/options.hpp"
#include "attn/reference.hpp"
#include "attn/rope.hpp"
#include "attn/scaled_dot_product.hpp"
#include "attn/score_mod.hpp"
#include "attn/sliding_window.hpp"
#include "attn/sparse.hpp"
#include "attn/tensor_view.hpp"
#include "attn/version.hpp"
