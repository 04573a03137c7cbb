// attn/engine/schedule.hpp — which piece of the problem a task computes.
//
// A call's work is cut into tasks (batch b, query head h, query tile, key
// split); a task's result depends only on its id, never on which worker ran
// it, so results are bitwise identical for any thread count. Tasks are
// numbered heaviest first: the last query tiles see the most keys under a
// causal mask, and dynamic scheduling then balances the tail.
#pragma once

#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>

namespace attn {
namespace detail {

struct Task {
  index_t b = 0, h = 0;      // batch, query head
  index_t q0 = 0, rows = 0;  // local query rows [q0, q0 + rows)
  index_t split = 0;         // key split, in [0, Schedule::splits)
};

struct Schedule {
  index_t batch = 0, heads = 0;  // B, Hq
  index_t lq = 0, br = 1;        // query length, rows per tile
  index_t splits = 1;            // key splits per query tile

  Schedule(const AttentionShape& s, index_t block_q, index_t key_splits = 1)
      : batch(s.batch), heads(s.q_heads), lq(s.lq), br(std::min(block_q, s.lq)),
        splits(key_splits) {}

  index_t q_tiles() const { return (lq + br - 1) / br; }
  index_t tasks() const { return batch * heads * q_tiles() * splits; }

  Task operator()(index_t t) const {
    const index_t bh = batch * heads;
    Task k;
    k.split = t % splits;
    t /= splits;
    const index_t qt = q_tiles() - 1 - t / bh;  // last query tiles first
    k.b = (t % bh) / heads;
    k.h = t % heads;
    k.q0 = qt * br;
    k.rows = std::min(br, lq - k.q0);
    return k;
  }
};

}  // namespace detail
}  // namespace attn
