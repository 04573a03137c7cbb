// attn/ops/cache.hpp — attention of new query rows against a KV cache.
//
// Append the new tokens' keys and values first, then attend: the Lq query rows
// of batch i are the last Lq tokens of cache sequence seq_ids[i] (length n_i),
// at global positions n_i - Lq ... n_i - 1, over its keys 0 ... n_i - 1. Masks
// and modifiers are bound per sequence to the global shape (Lq = Lk = n_i,
// batch 1), so causal(), window(...), alibi(...) equal the one-shot
// masked_attention over the whole sequence, of which this is the last Lq
// rows. One query row per sequence is decoding: the K/V of each GQA group is
// read once for all of its query heads and long sequences are split across
// threads (engine/segments.hpp). The paged cache reads its blocks in place
// (kv/blocks.hpp) and gives the same bits as the contiguous cache.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/engine/forward.hpp"
#include "attn/engine/segments.hpp"
#include "attn/kv/blocks.hpp"
#include "attn/kv/cache.hpp"
#include "attn/kv/paged.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <numeric>
#include <type_traits>
#include <vector>

namespace attn {

namespace detail {

/// The options a cache call refuses: positions (the cache knows them) and
/// dropout (inference).
inline void check_cache_options(const AttentionOptions& opt) {
  const Positions none{};
  if (opt.positions.q_offset != none.q_offset || opt.positions.k_offset != none.k_offset ||
      opt.positions.q_length != none.q_length || opt.positions.k_length != none.k_length)
    fail("cache attention takes positions from the cache; options.positions must be default");
  if (opt.dropout.p != 0)
    fail("this entry point has no dropout (inference); options.dropout.p is ", opt.dropout.p);
}

/// Checks q [n, Hq, Lq, D] and out [n, Hq, Lq, Dv] against a cache's heads and
/// dims and the sequence lengths (each >= Lq); binds the policies per
/// sequence and runs the segment forward over `kv`.
template <class T, class Q, class O, class Mask, class Mod>
void cache_entry(const TensorView<Q, 4>& q, const BlockKV<T>& kv, const TensorView<O, 4>& out,
                 const std::vector<index_t>& lengths, const std::vector<index_t>& seq_ids,
                 const Mask& mask, const Mod& mod, const AttentionOptions& opt) {
  static_assert(is_storage_type_v<std::remove_cv_t<Q>> && is_storage_type_v<O>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn: the output view must be writable");
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  check_view(q, "q");
  check_view(out, "out");
  AttentionShape s;
  s.batch = q.extent(0);
  s.q_heads = q.extent(1);
  s.lq = q.extent(2);
  s.d = q.extent(3);
  s.kv_heads = kv.heads;
  s.dv = kv.dv;
  if (static_cast<index_t>(seq_ids.size()) != s.batch)
    fail("seq_ids has ", seq_ids.size(), " sequences, but q has batch ", s.batch);
  if (s.d != kv.d) fail("q has head dim ", s.d, ", but the cache holds head dim ", kv.d);
  if (s.q_heads % s.kv_heads != 0)
    fail("the cache has ", s.kv_heads, " kv heads, which does not divide q's ", s.q_heads,
         " heads");
  if (out.extent(0) != s.batch || out.extent(1) != s.q_heads || out.extent(2) != s.lq ||
      out.extent(3) != s.dv)
    fail("out has shape ", shape_str(out), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
         ", ", s.dv, "] (sequences, q heads, Lq, Dv)");
  for (index_t i = 0; i < s.batch; ++i)
    if (lengths[static_cast<std::size_t>(i)] < s.lq)
      fail("sequence ", seq_ids[static_cast<std::size_t>(i)], " holds ",
           lengths[static_cast<std::size_t>(i)], " tokens, fewer than the ", s.lq,
           " query rows (append the new tokens before attending)");
  check_cache_options(opt);
  // The usual option and output checks, with the cache's first sequence standing in for k, v.
  s.lk = std::max<index_t>(s.lq, 1);
  check_not_self_overlapping(out, "out");
  check_no_overlap(out, "out", q, "q");
  if (opt.scale && !std::isfinite(*opt.scale)) fail("scale is ", *opt.scale, ", must be finite");
  if (opt.num_threads < 0) fail("num_threads is ", opt.num_threads, ", must be >= 0");
  if (opt.block_q < 0) fail("block_q is ", opt.block_q, ", must be >= 0 (0 = automatic)");
  if (opt.block_k < 0) fail("block_k is ", opt.block_k, ", must be >= 0 (0 = automatic)");
  check_sinks(opt.sinks, s.q_heads);
  if (!opt.sinks.is_null()) check_no_overlap(out, "out", opt.sinks, "sinks");
  if (!opt.lse.is_null()) {
    const auto& l = opt.lse;
    if (l.extent(0) != s.batch || l.extent(1) != s.q_heads || l.extent(2) != s.lq)
      fail("lse has shape ", shape_str(l), ", expected [", s.batch, ", ", s.q_heads, ", ", s.lq,
           "] (sequences, q heads, Lq)");
    check_view(l, "lse");
    check_not_self_overlapping(l, "lse");
    check_no_overlap(l, "lse", q, "q");
    check_no_overlap(l, "lse", out, "out");
  }

  const std::size_t n = seq_ids.size();
  std::vector<Mask> masks;
  std::vector<Mod> mods;
  masks.reserve(n);
  mods.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    AttentionShape g = s;
    g.batch = 1;
    g.lq = g.lk = lengths[i];
    masks.push_back(mask.bind(g));
    mods.push_back(mod.bind(g));
    check_policy_views(masks.back(), out, opt.lse);
    check_policy_views(mods.back(), out, opt.lse);
  }
  std::vector<Segment<Mask, Mod>> segs(n);
  for (std::size_t i = 0; i < n; ++i) {
    auto& sg = segs[i];
    sg.q_batch = sg.kv_batch = static_cast<index_t>(i);
    sg.rows = s.lq;
    sg.k_len = lengths[i];
    sg.q_pos = lengths[i] - s.lq;
    sg.mask = &masks[i];
    sg.mod = &mods[i];
  }
  using Acc = accum_t<Q, T, O>;
  const index_t br = opt.block_q > 0 ? opt.block_q : TileTraits::block_q;
  const index_t bc = opt.block_k > 0 ? opt.block_k : TileTraits::block_k;
  segment_forward<Acc, std::remove_cv_t<Q>>(q, kv, out, segs, s.q_heads, s.kv_heads, s.d, s.dv, br,
                                            bc, opt);
}

}  // namespace detail

/// Attention of q [n, Hq, Lq, D] against sequences seq_ids (n of them) of a
/// contiguous cache; out [n, Hq, Lq, Dv], options.lse [n, Hq, Lq].
template <class Q, class T, class O, class Mask = NoMask, class Mod = NoScoreMod>
void cache_attention(const TensorView<Q, 4>& q, const KVCache<T>& cache,
                     const std::vector<index_t>& seq_ids, const TensorView<O, 4>& out,
                     const Mask& mask = {}, const Mod& score_mod = {},
                     const AttentionOptions& options = {}) {
  std::vector<index_t> lengths(seq_ids.size());
  for (std::size_t i = 0; i < seq_ids.size(); ++i) lengths[i] = cache.length(seq_ids[i]);
  // Sequence b is one block of `capacity` tokens: block b of the pool.
  std::vector<index_t> blocks(seq_ids.begin(), seq_ids.end());
  std::vector<const index_t*> tables(seq_ids.size());
  for (std::size_t i = 0; i < seq_ids.size(); ++i) tables[i] = &blocks[i];
  detail::BlockKV<T> kv;
  kv.k = cache.keys().data();
  kv.v = cache.values().data();
  kv.k_scale = cache.key_scales().data();
  kv.v_scale = cache.value_scales().data();
  kv.heads = cache.kv_heads();
  kv.bs = cache.capacity();
  kv.d = cache.head_dim();
  kv.dv = cache.head_dim_v();
  kv.tables = tables.data();
  kv.lengths = lengths.data();
  detail::check_no_overlap(out, "out", cache.keys(), "the cache's keys");
  detail::check_no_overlap(out, "out", cache.values(), "the cache's values");
  detail::cache_entry(q, kv, out, lengths, seq_ids, mask, score_mod, options);
}

/// The same over every sequence of the cache, in order (q [B, Hq, Lq, D]).
template <class Q, class T, class O, class Mask = NoMask, class Mod = NoScoreMod>
void cache_attention(const TensorView<Q, 4>& q, const KVCache<T>& cache,
                     const TensorView<O, 4>& out, const Mask& mask = {}, const Mod& score_mod = {},
                     const AttentionOptions& options = {}) {
  std::vector<index_t> ids(static_cast<std::size_t>(cache.batch()));
  std::iota(ids.begin(), ids.end(), index_t{0});
  cache_attention(q, cache, ids, out, mask, score_mod, options);
}

/// Attention of q [n, Hq, Lq, D] against sequences seq_ids of a paged cache,
/// read through their block tables in place; out [n, Hq, Lq, Dv].
template <class Q, class T, class O, class Mask = NoMask, class Mod = NoScoreMod>
void paged_attention(const TensorView<Q, 4>& q, const PagedKVCache<T>& cache,
                     const std::vector<index_t>& seq_ids, const TensorView<O, 4>& out,
                     const Mask& mask = {}, const Mod& score_mod = {},
                     const AttentionOptions& options = {}) {
  std::vector<index_t> lengths(seq_ids.size());
  std::vector<const index_t*> tables(seq_ids.size());
  for (std::size_t i = 0; i < seq_ids.size(); ++i) {
    lengths[i] = cache.length(seq_ids[i]);  // throws for a freed or unknown sequence
    tables[i] = cache.block_table(seq_ids[i]).data();
  }
  detail::BlockKV<T> kv;
  kv.k = cache.pool_keys().data();
  kv.v = cache.pool_values().data();
  kv.k_scale = cache.pool_key_scales().data();
  kv.v_scale = cache.pool_value_scales().data();
  kv.heads = cache.kv_heads();
  kv.bs = cache.block_size();
  kv.d = cache.head_dim();
  kv.dv = cache.head_dim_v();
  kv.tables = tables.data();
  kv.lengths = lengths.data();
  detail::check_no_overlap(out, "out", cache.pool_keys(), "the cache's keys");
  detail::check_no_overlap(out, "out", cache.pool_values(), "the cache's values");
  detail::cache_entry(q, kv, out, lengths, seq_ids, mask, score_mod, options);
}

/// vLLM-style paged attention over caller-owned storage: pools k [blocks, Hkv,
/// block_size, D] and v [blocks, Hkv, block_size, Dv], contiguous; block_tables
/// [n, max_blocks] (row i lists the blocks of sequence i in token order) and
/// lengths (n tokens counts). q [n, Hq, Lq, D] are the last Lq tokens of each
/// sequence, as for the cache types. Every block a sequence uses is checked to
/// lie in the pool before anything is written.
template <class Q, class T, class O, class I, class Mask = NoMask, class Mod = NoScoreMod>
void paged_attention(const TensorView<Q, 4>& q, const TensorView<const T, 4>& k_pool,
                     const TensorView<const T, 4>& v_pool,
                     const TensorView<const I, 2>& block_tables,
                     const std::vector<index_t>& lengths, const TensorView<O, 4>& out,
                     const Mask& mask = {}, const Mod& score_mod = {},
                     const AttentionOptions& options = {}) {
  static_assert(std::is_integral<I>::value, "attn: block tables hold integers");
  static_assert(detail::is_storage_type_v<T>,
                "attn: pool element types must be float, double, Eigen::half or Eigen::bfloat16");
  using detail::fail;
  detail::check_view(k_pool, "k_pool");
  detail::check_view(v_pool, "v_pool");
  detail::check_view(block_tables, "block_tables");
  const index_t nb = k_pool.extent(0), heads = k_pool.extent(1), bs = k_pool.extent(2);
  const index_t d = k_pool.extent(3), dv = v_pool.extent(3);
  if (v_pool.extent(0) != nb || v_pool.extent(1) != heads || v_pool.extent(2) != bs)
    fail("v_pool has shape ", detail::shape_str(v_pool), ", expected [", nb, ", ", heads, ", ", bs,
         ", Dv] like k_pool ", detail::shape_str(k_pool));
  if (k_pool.stride(3) != 1 || k_pool.stride(2) != d || k_pool.stride(1) != bs * d ||
      k_pool.stride(0) != heads * bs * d || v_pool.stride(3) != 1 || v_pool.stride(2) != dv ||
      v_pool.stride(1) != bs * dv || v_pool.stride(0) != heads * bs * dv)
    fail("k_pool and v_pool must be contiguous [blocks, Hkv, block_size, D] buffers");
  const index_t n = q.extent(0);
  if (block_tables.extent(0) != n)
    fail("block_tables has ", block_tables.extent(0), " rows, but q has batch ", n);
  if (static_cast<index_t>(lengths.size()) != n)
    fail("lengths has ", lengths.size(), " entries, but q has batch ", n);
  const index_t width = block_tables.extent(1);
  std::vector<std::vector<index_t>> tables(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    const index_t len = lengths[static_cast<std::size_t>(i)];
    if (len < 0 || len > width * bs)
      fail("lengths[", i, "] is ", len, ", outside [0, ", width * bs, "] (", width,
           " table entries of ", bs, " tokens)");
    for (index_t j = 0; j < (len + bs - 1) / bs; ++j) {
      const auto blk = static_cast<index_t>(block_tables(i, j));
      if (blk < 0 || blk >= nb)
        fail("block_tables(", i, ", ", j, ") is ", blk, ", outside the pool's blocks [0, ", nb,
             ")");
      tables[static_cast<std::size_t>(i)].push_back(blk);
    }
  }
  std::vector<index_t> ids(static_cast<std::size_t>(n));
  std::iota(ids.begin(), ids.end(), index_t{0});
  std::vector<const index_t*> ptrs(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < ptrs.size(); ++i) ptrs[i] = tables[i].data();
  detail::BlockKV<T> kv;
  kv.k = k_pool.data();
  kv.v = v_pool.data();
  kv.heads = heads;
  kv.bs = bs;
  kv.d = d;
  kv.dv = dv;
  kv.tables = ptrs.data();
  kv.lengths = lengths.data();
  detail::check_no_overlap(out, "out", k_pool, "k_pool");
  detail::check_no_overlap(out, "out", v_pool, "v_pool");
  detail::check_no_overlap(out, "out", block_tables, "block_tables");
  detail::cache_entry(q, kv, out, lengths, ids, mask, score_mod, options);
}

}  // namespace attn
