// attn/kv/paged.hpp — a paged key/value cache: a pool of fixed-size blocks and
// a block table per sequence (vLLM's PagedAttention layout).
//
// Pool: K [num_blocks, Hkv, block_size, D], V [num_blocks, Hkv, block_size, Dv]
// (and for int8 a scale per (block, head, slot)). Token t of a sequence lives
// in slot t % block_size of block table[t / block_size]. Sequences grow block
// by block as tokens are appended, so memory follows the real lengths, not
// the longest one. fork(seq) starts a sequence that shares all of seq's
// blocks (a common prompt prefix); a shared block is copied only when one of
// its sequences appends into it (copy-on-write), and a block returns to the
// pool when no sequence holds it. Attention reads the blocks in place
// through the tables (attn/kv/attention.hpp).
#pragma once

#include "attn/core/memory.hpp"
#include "attn/detail/checks.hpp"
#include "attn/kv/cache.hpp"
#include "attn/kv/quant.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace attn {

template <class T>
class PagedKVCache {
  static_assert(detail::is_cache_type_v<T>,
                "attn::PagedKVCache holds float, double, Eigen::half, Eigen::bfloat16 or "
                "std::int8_t");

 public:
  /// A pool of num_blocks blocks of block_size tokens; head_dim_v = 0 means head_dim.
  PagedKVCache(index_t num_blocks, index_t block_size, index_t kv_heads, index_t head_dim,
               index_t head_dim_v = 0)
      : blocks_(num_blocks), bs_(block_size), heads_(kv_heads), d_(head_dim),
        dv_(head_dim_v == 0 ? head_dim : head_dim_v) {
    if (num_blocks <= 0) detail::fail("PagedKVCache num_blocks is ", num_blocks, ", must be > 0");
    if (block_size <= 0) detail::fail("PagedKVCache block_size is ", block_size, ", must be > 0");
    if (kv_heads <= 0) detail::fail("PagedKVCache kv_heads is ", kv_heads, ", must be > 0");
    if (head_dim <= 0) detail::fail("PagedKVCache head_dim is ", head_dim, ", must be > 0");
    if (head_dim_v < 0) detail::fail("PagedKVCache head_dim_v is ", head_dim_v, ", must be >= 0");
    const auto rows = static_cast<std::size_t>(blocks_ * heads_ * bs_);
    k_.assign(rows * static_cast<std::size_t>(d_), T(0));
    v_.assign(rows * static_cast<std::size_t>(dv_), T(0));
    if constexpr (detail::is_quantized_v<T>) {
      k_scale_.assign(rows, 0.0f);
      v_scale_.assign(rows, 0.0f);
    }
    refs_.assign(static_cast<std::size_t>(blocks_), 0);
    // Free list as a stack that hands out the lowest block first.
    for (index_t i = blocks_ - 1; i >= 0; --i) free_.push_back(i);
  }

  index_t num_blocks() const { return blocks_; }
  index_t block_size() const { return bs_; }
  index_t kv_heads() const { return heads_; }
  index_t head_dim() const { return d_; }
  index_t head_dim_v() const { return dv_; }
  index_t free_blocks() const { return static_cast<index_t>(free_.size()); }
  /// Bytes of the pool's K and V storage (and scales).
  std::size_t bytes() const {
    return (k_.size() + v_.size()) * sizeof(T) +
           (k_scale_.size() + v_scale_.size()) * sizeof(float);
  }

  /// A new empty sequence; returns its id (ids of freed sequences are reused).
  index_t add_sequence() {
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      if (!seqs_[i].live) {
        seqs_[i] = Seq{true, 0, {}};
        return static_cast<index_t>(i);
      }
    seqs_.push_back(Seq{true, 0, {}});
    return static_cast<index_t>(seqs_.size()) - 1;
  }

  /// A new sequence holding the same tokens as `seq`, sharing its blocks.
  index_t fork(index_t seq) {
    check_live(seq);
    const Seq copy = seqs_[static_cast<std::size_t>(seq)];
    const index_t id = add_sequence();
    seqs_[static_cast<std::size_t>(id)] = copy;
    for (index_t blk : copy.table) ++refs_[static_cast<std::size_t>(blk)];
    return id;
  }

  /// Ends a sequence: its blocks return to the pool unless another sequence holds them.
  void free(index_t seq) {
    check_live(seq);
    Seq& s = seqs_[static_cast<std::size_t>(seq)];
    // Return blocks last first, so the next allocation takes back the lowest.
    for (auto it = s.table.rbegin(); it != s.table.rend(); ++it)
      if (--refs_[static_cast<std::size_t>(*it)] == 0) free_.push_back(*it);
    s = Seq{};
  }

  /// True while `seq` is a sequence of this cache (added and not freed).
  bool is_live(index_t seq) const {
    return seq >= 0 && seq < static_cast<index_t>(seqs_.size()) &&
           seqs_[static_cast<std::size_t>(seq)].live;
  }
  index_t length(index_t seq) const {
    check_live(seq);
    return seqs_[static_cast<std::size_t>(seq)].length;
  }
  /// Blocks of `seq`, in token order.
  const std::vector<index_t>& block_table(index_t seq) const {
    check_live(seq);
    return seqs_[static_cast<std::size_t>(seq)].table;
  }
  /// Sequences holding block `blk` (0 when it is free).
  index_t ref_count(index_t blk) const {
    if (blk < 0 || blk >= blocks_) detail::fail("block ", blk, " is outside [0, ", blocks_, ")");
    return refs_[static_cast<std::size_t>(blk)];
  }

  /// Blocks an append of n tokens to `seq` takes from the pool (new blocks,
  /// plus one if the last block is shared and must be copied first).
  index_t blocks_needed(index_t seq, index_t n) const {
    check_live(seq);
    const Seq& s = seqs_[static_cast<std::size_t>(seq)];
    const index_t have = static_cast<index_t>(s.table.size());
    const index_t need = (s.length + n + bs_ - 1) / bs_;
    const bool cow =
        n > 0 && s.length % bs_ != 0 && refs_[static_cast<std::size_t>(s.table.back())] > 1;
    return std::max<index_t>(need - have, 0) + (cow ? 1 : 0);
  }

  /// Appends n tokens to `seq`: k [1, Hkv, n, D], v [1, Hkv, n, Dv], any
  /// storage type and strides. Throws attn::Error (nothing written, no block
  /// taken) for a dead sequence, a shape mismatch or too few free blocks.
  template <class U, class W>
  void append(index_t seq, const TensorView<U, 4>& k, const TensorView<W, 4>& v) {
    check_live(seq);
    const index_t n = detail::check_append_views(k, v, 1, heads_, d_, dv_);
    const index_t need = blocks_needed(seq, n);
    if (need > free_blocks())
      detail::fail("appending ", n, " tokens to sequence ", seq, " needs ", need,
                   " free blocks, the pool has ", free_blocks(), " of ", blocks_);
    detail::check_no_overlap(pool_keys(), "the cache's keys", k, "k");
    detail::check_no_overlap(pool_values(), "the cache's values", v, "v");
    detail::check_no_overlap(pool_keys(), "the cache's keys", v, "v");
    detail::check_no_overlap(pool_values(), "the cache's values", k, "k");
    detail::check_finite_for<T>(k, "k");
    detail::check_finite_for<T>(v, "v");

    Seq& s = seqs_[static_cast<std::size_t>(seq)];
    if (n > 0 && s.length % bs_ != 0 && refs_[static_cast<std::size_t>(s.table.back())] > 1) {
      // Copy-on-write: the partly filled last block is shared; take a private copy.
      const index_t old = s.table.back();
      const index_t blk = take_block();
      copy_block(old, blk, s.length % bs_);
      --refs_[static_cast<std::size_t>(old)];
      s.table.back() = blk;
    }
    for (index_t t = 0; t < n; ++t) {
      const index_t pos = s.length + t;
      if (pos / bs_ == static_cast<index_t>(s.table.size())) s.table.push_back(take_block());
      const index_t blk = s.table[static_cast<std::size_t>(pos / bs_)], slot = pos % bs_;
      for (index_t h = 0; h < heads_; ++h) {
        const index_t row = (blk * heads_ + h) * bs_ + slot;
        const float sk = detail::store_row(&k(0, h, t, 0), k.stride(3), d_, k_.data() + row * d_);
        const float sv = detail::store_row(&v(0, h, t, 0), v.stride(3), dv_, v_.data() + row * dv_);
        if constexpr (detail::is_quantized_v<T>) {
          k_scale_[static_cast<std::size_t>(row)] = sk;
          v_scale_[static_cast<std::size_t>(row)] = sv;
        }
      }
    }
    s.length += n;
  }

  /// The pool: K [num_blocks, Hkv, block_size, D], V [num_blocks, Hkv, block_size, Dv].
  TensorView<const T, 4> pool_keys() const {
    return bhsd<const T>(k_.data(), blocks_, heads_, bs_, d_);
  }
  TensorView<const T, 4> pool_values() const {
    return bhsd<const T>(v_.data(), blocks_, heads_, bs_, dv_);
  }
  /// int8 caches: scales [num_blocks, Hkv, block_size] (empty views otherwise).
  TensorView<const float, 3> pool_key_scales() const { return scale_view(k_scale_); }
  TensorView<const float, 3> pool_value_scales() const { return scale_view(v_scale_); }

 private:
  struct Seq {
    bool live = false;
    index_t length = 0;
    std::vector<index_t> table;
  };

  void check_live(index_t seq) const {
    if (seq < 0 || seq >= static_cast<index_t>(seqs_.size()))
      detail::fail("sequence ", seq, " is not a sequence of this PagedKVCache (ids [0, ",
                   seqs_.size(), "))");
    if (!seqs_[static_cast<std::size_t>(seq)].live) detail::fail("sequence ", seq, " was freed");
  }
  index_t take_block() {
    const index_t blk = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(blk)] = 1;
    return blk;
  }
  void copy_block(index_t from, index_t to, index_t slots) {
    for (index_t h = 0; h < heads_; ++h) {
      const index_t a = (from * heads_ + h) * bs_, b = (to * heads_ + h) * bs_;
      std::copy_n(k_.begin() + a * d_, slots * d_, k_.begin() + b * d_);
      std::copy_n(v_.begin() + a * dv_, slots * dv_, v_.begin() + b * dv_);
      if constexpr (detail::is_quantized_v<T>) {
        std::copy_n(k_scale_.begin() + a, slots, k_scale_.begin() + b);
        std::copy_n(v_scale_.begin() + a, slots, v_scale_.begin() + b);
      }
    }
  }
  TensorView<const float, 3> scale_view(const std::vector<float>& s) const {
    if (s.empty()) return {};
    return TensorView<const float, 3>(s.data(), {blocks_, heads_, bs_});
  }

  index_t blocks_, bs_, heads_, d_, dv_;
  std::vector<T, detail::LargeAllocator<T>> k_, v_;  // huge pages (core/memory.hpp)
  std::vector<float> k_scale_, v_scale_;
  std::vector<index_t> refs_;
  std::vector<index_t> free_;
  std::vector<Seq> seqs_;
};

}  // namespace attn
