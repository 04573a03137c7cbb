// attn/ops/neighborhood.hpp — neighbourhood attention (NATTEN) on the flash
// engine, with boundary tiles masked run by run instead of key by key.
//
// masked_attention(q, k, v, out, attn::neighborhood(...)) is already exact
// and skips every tile outside the windows; but on a 2-D or 3-D grid almost
// every computed tile is partial (a window is K short runs per row of the
// grid), and the engine then asks keep(q, k) per score. This entry point
// runs the same engine with the neighbourhood's tiles marked "full" and a
// last score modifier that writes -inf outside each query's window, one run
// of the last grid dimension at a time (a memset-like fill), so masking
// costs about as much as writing the tile once.
#pragma once

#include "attn/detail/flash_engine.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/neighborhood.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <limits>
#include <type_traits>

namespace attn {
namespace detail {

/// The neighbourhood with its partial tiles reported as full: the engine then
/// leaves their masking to NeighborhoodFill, which must be the last modifier.
struct NeighborhoodTiles : MaskPolicy {
  static constexpr bool always_full = false;
  Neighborhood nb;
  NeighborhoodTiles bind(const AttentionShape& s) const { return {{}, nb.bind(s)}; }
  bool keep(index_t b, index_t h, index_t q, index_t k) const { return nb.keep(b, h, q, k); }
  KeyRange key_range(index_t b, index_t h, index_t q0, index_t q1) const {
    return nb.key_range(b, h, q0, q1);
  }
  TileKind classify(index_t b, index_t h, index_t q0, index_t q1, index_t k0, index_t k1) const {
    return nb.classify(b, h, q0, q1, k0, k1) == TileKind::empty ? TileKind::empty : TileKind::full;
  }
};

/// Writes -inf over the scores outside each query's window (the neighbourhood
/// mask, as a modifier applied after the caller's modifiers).
struct NeighborhoodFill : ScoreModPolicy {
  static constexpr bool is_identity = false;
  Neighborhood nb;
  NeighborhoodFill bind(const AttentionShape& s) const { return {{}, nb.bind(s)}; }
  template <class Acc>
  Acc operator()(index_t b, index_t h, index_t q, index_t k, Acc s) const {
    return nb.keep(b, h, q, k) ? s : -std::numeric_limits<Acc>::infinity();
  }
  template <class Acc>
  void apply_tile(index_t, index_t, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    const index_t dil = nb.dilation[nb.dims - 1];
    for (index_t r = 0; r < rows; ++r) {
      Acc* row = s + r * ld;
      nb.for_each_run(q0 + r, k0, k0 + cols, [&](index_t c0, index_t n, index_t lo, index_t hi) {
        Acc* run = row + c0;
        std::fill(run, run + lo, neg_inf);
        std::fill(run + hi, run + n, neg_inf);
        if (dil > 1)  // between the dilated keys
          for (index_t c = lo; c < hi; c += dil)
            std::fill(run + c + 1, run + std::min(c + dil, hi), neg_inf);
      });
    }
  }
};

}  // namespace detail

/// Neighbourhood attention: each query of a grid of tokens attends to its
/// kernel^d neighbours (attn::neighborhood(grid, kernel, dilation)), in
/// O(N·K^d) work plus tile rounding. `mask` (optional) further restricts the
/// keys (a key is kept iff both keep it); `score_mod` is applied before the
/// neighbourhood mask, as in masked_attention (e.g. attn::relative_bias_2d).
/// Results equal masked_attention(q, k, v, out, nb & mask, score_mod) within
/// rounding; options.stats counts the neighbourhood's boundary tiles as full.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void neighborhood_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                            const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                            const Neighborhood& nb, const Mask& mask = {},
                            const Mod& score_mod = {}, const AttentionOptions& options = {}) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  // 128-row query tiles unless the caller chose: the engine's 256-row tiles for long
  // sequences (default_block_q) span twice the grid columns, so each query's K runs
  // meet twice the key tiles once a grid row is longer than a tile. 7 × 7 on a
  // 512 × 512 grid: 6.5 µs per pixel with 256 rows, 3.0 with 128, the same as on
  // 256 × 256 (2 threads, Emerald Rapids).
  AttentionOptions opt = options;
  if (opt.block_q == 0) opt.block_q = detail::TileTraits::block_q;
  detail::attention_entry(q, k, v, out, detail::NeighborhoodTiles{{}, nb} & mask,
                          compose(score_mod, detail::NeighborhoodFill{{}, nb}), opt);
}

/// Same, with options and no extra mask or score modifier.
template <class Q, class K, class V, class O>
void neighborhood_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                            const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                            const Neighborhood& nb, const AttentionOptions& options) {
  neighborhood_attention(q, k, v, out, nb, no_mask(), no_score_mod(), options);
}

}  // namespace attn
