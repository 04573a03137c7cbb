// attn/sparse.hpp — block-sparse attention: which key blocks each query block
// sees, stored as compressed rows, and the presets built from it (local band,
// global and random blocks, BigBird, Longformer).
//
// The sequence is cut into blocks: query block i holds rows
// [i·block_q, (i+1)·block_q) and key block j holds keys [j·block_k, (j+1)·block_k)
// (the last block of each may be shorter). Query row q sees key k iff the
// layout lists key block k / block_k for query block q / block_q, and any
// per-element mask given with it keeps (q, k). sparse_attention runs the flash
// engine with tiles equal to the blocks, so each listed block is one tile and
// the work is O(nnz · block_q · block_k · (D + Dv)).
#pragma once

#include "attn/engine/forward.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace attn {

namespace detail {
/// Reproducible sampling of distinct blocks: mt19937_64 is specified exactly
/// by the standard, and the bounded draw below (rejection above the largest
/// multiple of n) is ours, unlike std::uniform_int_distribution whose output
/// differs between standard libraries. The same seed gives the same blocks
/// on every platform.
class BlockSampler {
 public:
  explicit BlockSampler(std::uint64_t seed) : gen_(seed) {}

  /// Uniform in [0, n), n > 0.
  index_t below(index_t n) {
    constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    const std::uint64_t un = static_cast<std::uint64_t>(n);
    const std::uint64_t limit = max - max % un;  // [0, limit) maps evenly onto [0, n)
    std::uint64_t x = gen_();
    while (x >= limit) x = gen_();
    return static_cast<index_t>(x % un);
  }

  /// Appends to `row` `count` distinct blocks of [0, n) that are not in
  /// `excluded` (sorted, distinct, within [0, n)), uniformly; all candidates
  /// when there are no more than `count`. Rejection sampling when the
  /// candidates are many (O(count) expected draws), a partial Fisher–Yates
  /// shuffle of the candidate list otherwise, so a row costs O(count) for
  /// long sequences and the whole layout stays linear in their length.
  void draw(index_t n, const std::vector<index_t>& excluded, index_t count,
            std::vector<index_t>& row) {
    auto is_excluded = [&](index_t j) {
      return std::binary_search(excluded.begin(), excluded.end(), j);
    };
    const index_t candidates = n - static_cast<index_t>(excluded.size());
    if (count >= candidates) {
      for (index_t j = 0; j < n; ++j)
        if (!is_excluded(j)) row.push_back(j);
      return;
    }
    const std::size_t first = row.size();
    if (count < candidates / 4) {  // (4 · count could overflow)
      while (static_cast<index_t>(row.size() - first) < count) {
        const index_t j = below(n);
        if (is_excluded(j) ||
            std::find(row.begin() + static_cast<std::ptrdiff_t>(first), row.end(), j) != row.end())
          continue;
        row.push_back(j);
      }
      return;
    }
    pool_.clear();
    for (index_t j = 0; j < n; ++j)
      if (!is_excluded(j)) pool_.push_back(j);
    for (index_t t = 0; t < count; ++t) {
      const index_t pick = t + below(candidates - t);  // uniform over the candidates not yet taken
      std::swap(pool_[static_cast<std::size_t>(t)], pool_[static_cast<std::size_t>(pick)]);
      row.push_back(pool_[static_cast<std::size_t>(t)]);
    }
  }

 private:
  std::mt19937_64 gen_;
  std::vector<index_t> pool_;
};
}  // namespace detail

// ----------------------------------------------------------------- layout --

/// Which key blocks each query block sees, for one head (heads() == 1, shared
/// by all query heads) or for each query head (heads() == Hq). Stored as
/// compressed sparse rows: row r = head · q_blocks + query block lists its key
/// blocks, sorted and distinct, in cols()[row_offsets()[r] .. row_offsets()[r+1]).
/// Memory is O(heads · (q_blocks + nnz)), linear in the sequence length for
/// every preset here.
class BlockSparseLayout {
 public:
  /// An empty layout (no blocks; sparse_attention rejects it).
  BlockSparseLayout() = default;

  /// A layout from compressed rows. `row_offsets` has heads · q_blocks + 1
  /// non-decreasing entries starting at 0 and ending at cols.size(); each
  /// row's key blocks must be distinct, sorted and in [0, k_blocks). Throws
  /// attn::Error naming the first violation.
  BlockSparseLayout(index_t block_q, index_t block_k, index_t q_blocks, index_t k_blocks,
                    index_t heads, std::vector<index_t> row_offsets, std::vector<index_t> cols)
      : block_q_(block_q), block_k_(block_k), q_blocks_(q_blocks), k_blocks_(k_blocks),
        heads_(heads), offsets_(std::move(row_offsets)), cols_(std::move(cols)) {
    check_grid(block_q_, block_k_, q_blocks_, k_blocks_, heads_);
    const index_t rows = heads_ * q_blocks_;  // fits: check_grid
    if (static_cast<index_t>(offsets_.size()) != rows + 1)
      detail::fail("block-sparse layout has ", offsets_.size(),
                   " row offsets, expected heads · q_blocks + 1 = ", rows + 1);
    if (offsets_.empty() || offsets_.front() != 0 ||
        offsets_.back() != static_cast<index_t>(cols_.size()))
      detail::fail("block-sparse layout row offsets run from ",
                   offsets_.empty() ? index_t{0} : offsets_.front(), " to ",
                   offsets_.empty() ? index_t{0} : offsets_.back(),
                   ", expected 0 to the number of key blocks listed, ", cols_.size());
    for (index_t r = 0; r < rows;
         ++r)  // non-decreasing from 0 to cols.size(): every row lies in cols
      if (offsets_[static_cast<std::size_t>(r + 1)] < offsets_[static_cast<std::size_t>(r)])
        detail::fail("block-sparse layout row offsets decrease at row ", r, ": ",
                     offsets_[static_cast<std::size_t>(r)], " then ",
                     offsets_[static_cast<std::size_t>(r + 1)]);
    for (index_t r = 0; r < rows; ++r) {
      const index_t a = offsets_[static_cast<std::size_t>(r)],
                    e = offsets_[static_cast<std::size_t>(r + 1)];
      for (index_t i = a; i < e; ++i) {
        const index_t c = cols_[static_cast<std::size_t>(i)];
        if (c < 0 || c >= k_blocks_)
          detail::fail("block-sparse layout: head ", r / q_blocks_, " query block ", r % q_blocks_,
                       " lists key block ", c, ", outside [0, ", k_blocks_, ")");
        if (i > a && c <= cols_[static_cast<std::size_t>(i - 1)])
          detail::fail("block-sparse layout: head ", r / q_blocks_, " query block ", r % q_blocks_,
                       " lists key block ", c, " after ", cols_[static_cast<std::size_t>(i - 1)],
                       " (must be sorted and distinct)");
      }
    }
  }

  /// A layout from a dense block mask: mask[(head · q_blocks + i) · k_blocks + j]
  /// is true iff query block i of that head sees key block j; `heads` is 1
  /// (shared) or the number of query heads.
  static BlockSparseLayout from_block_mask(index_t block_q, index_t block_k, index_t q_blocks,
                                           index_t k_blocks, const std::vector<bool>& mask,
                                           index_t heads = 1) {
    check_grid(block_q, block_k, q_blocks, k_blocks, heads);
    const index_t entries =
        detail::checked_mul(heads * q_blocks, k_blocks, "block mask heads · q_blocks · k_blocks");
    if (mask.size() != static_cast<std::size_t>(entries))
      detail::fail("block mask has ", mask.size(),
                   " entries, expected heads · q_blocks · k_blocks = ", heads, " · ", q_blocks,
                   " · ", k_blocks, " = ", entries);
    std::vector<index_t> offsets{0}, cols;
    offsets.reserve(static_cast<std::size_t>(heads * q_blocks + 1));
    for (index_t r = 0; r < heads * q_blocks; ++r) {
      for (index_t j = 0; j < k_blocks; ++j)
        if (mask[static_cast<std::size_t>(r * k_blocks + j)]) cols.push_back(j);
      offsets.push_back(static_cast<index_t>(cols.size()));
    }
    return {block_q, block_k, q_blocks, k_blocks, heads, std::move(offsets), std::move(cols)};
  }

  /// Self-attention over seq_len tokens in blocks of `block`, row by row:
  /// fill(h, i, row) appends the key blocks that query block i of head h
  /// sees (any order, duplicates allowed), for h < heads and i < ceil(seq_len
  /// / block). The general builder behind the presets.
  template <class Fill>
  static BlockSparseLayout from_rows(index_t seq_len, index_t block, index_t heads, Fill fill) {
    const index_t n = blocks_for(seq_len, block, "seq_len");
    check_grid(block, block, n, n, heads);
    std::vector<index_t> offsets{0}, cols, row;
    offsets.reserve(static_cast<std::size_t>(heads * n + 1));  // fails now, not after a long loop
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < n; ++i) {
        row.clear();
        fill(h, i, row);
        std::sort(row.begin(), row.end());
        row.erase(std::unique(row.begin(), row.end()), row.end());
        cols.insert(cols.end(), row.begin(), row.end());
        offsets.push_back(static_cast<index_t>(cols.size()));
      }
    return {block, block, n, n, heads, std::move(offsets), std::move(cols)};
  }

  /// Self-attention over seq_len tokens in blocks of `block`: query block i
  /// sees key blocks [i - left, i + right] (clipped to the sequence). A
  /// negative bound is unbounded on that side.
  static BlockSparseLayout local(index_t seq_len, index_t block, index_t left, index_t right) {
    const index_t n = blocks_for(seq_len, block, "seq_len");
    return from_rows(seq_len, block, 1, [&](index_t, index_t i, std::vector<index_t>& row) {
      const index_t a = left < 0 || left >= n ? 0 : std::max<index_t>(0, i - left);
      const index_t e = right < 0 || right >= n ? n - 1 : std::min(n - 1, i + right);
      for (index_t j = a; j <= e; ++j) row.push_back(j);
    });
  }

  /// Self-attention over seq_len tokens: the listed blocks are global, i.e.
  /// each sees every block and is seen by every block. Nothing else is set.
  static BlockSparseLayout global(index_t seq_len, index_t block,
                                  const std::vector<index_t>& blocks) {
    const index_t n = blocks_for(seq_len, block, "seq_len");
    std::vector<index_t> sorted = blocks;
    for (index_t g : sorted)
      if (g < 0 || g >= n)
        detail::fail("global block ", g, " is outside [0, ", n, ") (seq_len ", seq_len,
                     " in blocks of ", block, ")");
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    return from_rows(seq_len, block, 1, [&](index_t, index_t i, std::vector<index_t>& row) {
      if (std::binary_search(sorted.begin(), sorted.end(), i)) {
        for (index_t j = 0; j < n; ++j) row.push_back(j);  // a global block sees everything
      } else {
        row.insert(row.end(), sorted.begin(), sorted.end());  // and is seen by every block
      }
    });
  }

  /// Self-attention over seq_len tokens: each query block sees `per_row`
  /// distinct key blocks drawn uniformly at random (all blocks when there are
  /// no more than per_row). The draw depends only on (seed, seq_len, block,
  /// per_row, heads): the same arguments give the same layout on every
  /// platform. heads > 1 draws each head independently.
  static BlockSparseLayout random(index_t seq_len, index_t block, index_t per_row,
                                  std::uint64_t seed, index_t heads = 1) {
    const index_t n = blocks_for(seq_len, block, "seq_len");
    if (per_row < 0) detail::fail("random blocks per row is ", per_row, ", must be >= 0");
    detail::BlockSampler sampler(seed);
    const std::vector<index_t> none;
    return from_rows(seq_len, block, heads, [&](index_t, index_t, std::vector<index_t>& row) {
      sampler.draw(n, none, per_row, row);
    });
  }

  /// The union: a block is listed iff either layout lists it. Both must have
  /// the same block sizes and block counts; a shared layout (1 head) joins a
  /// per-head one by applying to each of its heads.
  friend BlockSparseLayout operator|(const BlockSparseLayout& a, const BlockSparseLayout& b) {
    if (a.block_q_ != b.block_q_ || a.block_k_ != b.block_k_ || a.q_blocks_ != b.q_blocks_ ||
        a.k_blocks_ != b.k_blocks_)
      detail::fail("union of block-sparse layouts with different grids: ", a.grid_str(), " and ",
                   b.grid_str());
    if (a.heads_ != b.heads_ && a.heads_ != 1 && b.heads_ != 1)
      detail::fail("union of block-sparse layouts with ", a.heads_, " and ", b.heads_,
                   " heads (each must be 1 or the other's count)");
    const index_t heads = std::max(a.heads_, b.heads_);
    std::vector<index_t> offsets{0}, cols;
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < a.q_blocks_; ++i) {
        const auto ra = a.row(h, i), rb = b.row(h, i);
        std::set_union(ra.first, ra.second, rb.first, rb.second, std::back_inserter(cols));
        offsets.push_back(static_cast<index_t>(cols.size()));
      }
    return {a.block_q_, a.block_k_,         a.q_blocks_,    a.k_blocks_,
            heads,      std::move(offsets), std::move(cols)};
  }

  index_t block_q() const { return block_q_; }    ///< query rows per block
  index_t block_k() const { return block_k_; }    ///< keys per block
  index_t q_blocks() const { return q_blocks_; }  ///< query blocks: ceil(Lq / block_q)
  index_t k_blocks() const { return k_blocks_; }  ///< key blocks: ceil(Lk / block_k)
  index_t heads() const { return heads_; }        ///< 1 (shared by all heads) or Hq
  /// Listed (head, query block, key block) triples.
  index_t nnz() const { return static_cast<index_t>(cols_.size()); }
  const std::vector<index_t>& row_offsets() const { return offsets_; }
  const std::vector<index_t>& cols() const { return cols_; }

  /// The sorted key blocks query block i of query head h sees, as [first, last).
  std::pair<const index_t*, const index_t*> row(index_t h, index_t i) const {
    const std::size_t r = static_cast<std::size_t>((heads_ == 1 ? 0 : h) * q_blocks_ + i);
    return {cols_.data() + offsets_[r], cols_.data() + offsets_[r + 1]};
  }

  /// Does query block i of query head h see key block j?
  bool contains(index_t h, index_t i, index_t j) const {
    const auto r = row(h, i);
    return std::binary_search(r.first, r.second, j);
  }

  /// Throws attn::Error unless the layout fits a problem with these lengths
  /// and query heads: q_blocks = ceil(lq / block_q), k_blocks = ceil(lk /
  /// block_k), heads 1 or q_heads.
  void validate(index_t lq, index_t lk, index_t q_heads = 1) const {
    if (block_q_ <= 0 || block_k_ <= 0)
      detail::fail("block-sparse layout is empty (block sizes ", block_q_, " and ", block_k_, ")");
    const index_t qb = lq / block_q_ + (lq % block_q_ != 0);  // ceil, no overflow
    const index_t kb = lk / block_k_ + (lk % block_k_ != 0);
    if (qb != q_blocks_)
      detail::fail("block-sparse layout has ", q_blocks_, " query blocks of ", block_q_,
                   " rows, but Lq = ", lq, " needs ", qb);
    if (kb != k_blocks_)
      detail::fail("block-sparse layout has ", k_blocks_, " key blocks of ", block_k_,
                   " keys, but Lk = ", lk, " needs ", kb);
    // the engine forms (last key block + 1) · block_k
    (void)detail::checked_mul(k_blocks_, block_k_, "block-sparse layout k_blocks · block_k");
    (void)detail::checked_mul(q_blocks_, block_q_, "block-sparse layout q_blocks · block_q");
    if (heads_ != 1 && heads_ != q_heads)
      detail::fail("block-sparse layout has ", heads_, " heads, but q has ", q_heads,
                   " heads (the layout needs 1 or ", q_heads, ")");
  }

 private:
  /// Grid arguments common to every constructor.
  static void check_grid(index_t block_q, index_t block_k, index_t q_blocks, index_t k_blocks,
                         index_t heads) {
    if (block_q <= 0) detail::fail("block-sparse layout block_q is ", block_q, ", must be > 0");
    if (block_k <= 0) detail::fail("block-sparse layout block_k is ", block_k, ", must be > 0");
    if (q_blocks <= 0 || k_blocks <= 0)
      detail::fail("block-sparse layout has ", q_blocks, " query blocks and ", k_blocks,
                   " key blocks, both must be > 0");
    if (heads <= 0) detail::fail("block-sparse layout has ", heads, " heads, must be > 0");
    // heads · q_blocks + 1 row offsets are stored
    std::int64_t rows = 0;
    if (!detail::mul_fits(heads, q_blocks, rows) || rows >= max_rows)
      detail::fail("block-sparse layout has ", heads, " heads · ", q_blocks,
                   " query blocks, more rows than a layout holds (", max_rows, ")");
  }

 public:
  /// Most rows (heads · query blocks) of a layout, 2^32 (32 GiB of row
  /// offsets); larger counts are refused before anything is allocated.
  static constexpr index_t max_rows = index_t{1} << 32;

 private:
  /// ceil(seq_len / block), after checking both.
  static index_t blocks_for(index_t seq_len, index_t block, const char* what) {
    if (block <= 0) detail::fail("block size is ", block, ", must be > 0");
    if (seq_len <= 0) detail::fail(what, " is ", seq_len, ", must be > 0");
    return seq_len / block + (seq_len % block != 0);  // ceil, without seq_len + block overflowing
  }

  std::string grid_str() const {
    std::ostringstream os;
    os << q_blocks_ << "×" << k_blocks_ << " blocks of " << block_q_ << "×" << block_k_;
    return os.str();
  }

  index_t block_q_ = 0, block_k_ = 0, q_blocks_ = 0, k_blocks_ = 0, heads_ = 0;
  std::vector<index_t> offsets_{0};
  std::vector<index_t> cols_;
};

// ---------------------------------------------------------------- presets --

/// BigBird's block-sparse pattern (Zaheer et al. 2020, the ITC variant that
/// the published models use; defaults as in their released configurations:
/// block_size 64, num_random_blocks 3).
struct BigBirdConfig {
  index_t block = 64;         ///< tokens per block
  index_t window_blocks = 3;  ///< odd: the block itself and (w - 1) / 2 on each side
  /// Global blocks: the first ceil(g / 2) and the last floor(g / 2) blocks
  /// (g = 2: the first and the last block, as in BigBird ITC).
  index_t global_blocks = 2;
  index_t random_blocks = 3;  ///< per query block, drawn outside its window and the globals
  std::uint64_t seed = 0;     ///< random blocks are reproducible from this
  index_t heads = 1;          ///< 1: one layout for all heads; Hq: each head draws its own
};

/// BigBird self-attention layout over seq_len tokens: a global block sees
/// every block; every other query block sees its window blocks, the global
/// blocks and `random_blocks` random blocks drawn (seeded) from the rest.
/// Rows per non-global block: window + global + random, so nnz is linear in
/// seq_len.
inline BlockSparseLayout bigbird(index_t seq_len, const BigBirdConfig& cfg = {}) {
  if (cfg.window_blocks < 1 || cfg.window_blocks % 2 == 0)
    detail::fail("bigbird window_blocks is ", cfg.window_blocks, ", must be odd and >= 1");
  if (cfg.global_blocks < 0)
    detail::fail("bigbird global_blocks is ", cfg.global_blocks, ", must be >= 0");
  if (cfg.random_blocks < 0)
    detail::fail("bigbird random_blocks is ", cfg.random_blocks, ", must be >= 0");
  if (cfg.block <= 0) detail::fail("bigbird block is ", cfg.block, ", must be > 0");
  if (seq_len <= 0) detail::fail("seq_len is ", seq_len, ", must be > 0");
  const index_t n = seq_len / cfg.block + (seq_len % cfg.block != 0);  // ceil, no overflow
  const index_t first =
      std::min(n, cfg.global_blocks / 2 + cfg.global_blocks % 2);   // global blocks [0, first)
  const index_t last = std::max(first, n - cfg.global_blocks / 2);  // and [last, n)
  const index_t half = std::min(n, (cfg.window_blocks - 1) / 2);
  detail::BlockSampler sampler(cfg.seed);
  std::vector<index_t> excluded;
  return BlockSparseLayout::from_rows(
      seq_len, cfg.block, cfg.heads, [&](index_t, index_t i, std::vector<index_t>& row) {
        if (i < first || i >= last) {  // a global query block sees everything
          for (index_t j = 0; j < n; ++j) row.push_back(j);
          return;
        }
        // Window and global key blocks, then random ones from the others.
        excluded.clear();
        for (index_t j = 0; j < first; ++j) excluded.push_back(j);
        for (index_t j = std::max(first, i - half); j <= std::min(last - 1, i + half); ++j)
          excluded.push_back(j);
        for (index_t j = last; j < n; ++j) excluded.push_back(j);
        row.insert(row.end(), excluded.begin(), excluded.end());
        sampler.draw(n, excluded, cfg.random_blocks, row);
      });
}

/// Longformer's pattern at block granularity (Beltagy et al. 2020: a sliding
/// window of `window` tokens, window / 2 on each side, as in the released
/// models' attention_window = 512, plus task-specific global tokens that the
/// caller names).
struct LongformerConfig {
  index_t window = 512;  ///< total window in tokens; a multiple of 2 · block
  index_t block = 64;    ///< tokens per block
};

/// Longformer self-attention layout over seq_len tokens: query block i sees
/// key blocks i - w/(2b) ... i + w/(2b) (w = window, b = block), and the
/// block of every token in `global_tokens` is global (sees and is seen by
/// all). Block granularity makes this a superset of the token-level pattern:
/// each token sees at least window / 2 tokens on each side, and at most
/// block - 1 more.
inline BlockSparseLayout longformer(index_t seq_len, const std::vector<index_t>& global_tokens,
                                    const LongformerConfig& cfg = {}) {
  if (cfg.block <= 0) detail::fail("longformer block is ", cfg.block, ", must be > 0");
  const index_t two_blocks = detail::checked_mul(2, cfg.block, "longformer 2 · block");
  if (cfg.window < 0 || cfg.window % two_blocks != 0)
    detail::fail("longformer window is ", cfg.window,
                 ", must be a non-negative multiple of 2 · block = ", two_blocks);
  if (seq_len <= 0) detail::fail("seq_len is ", seq_len, ", must be > 0");
  std::vector<index_t> global;
  for (index_t t : global_tokens) {
    if (t < 0 || t >= seq_len)
      detail::fail("longformer global token ", t, " is outside [0, seq_len = ", seq_len, ")");
    global.push_back(t / cfg.block);
  }
  const index_t half = cfg.window / two_blocks;
  return BlockSparseLayout::local(seq_len, cfg.block, half, half) |
         BlockSparseLayout::global(seq_len, cfg.block, global);
}

// ------------------------------------------------------------ mask policy --

/// A block-sparse layout as a mask policy, conjoined with a per-element mask
/// `inner` (no_mask(), causal(), key_padding(...), ...): query q sees key k
/// iff the layout lists block (q / block_q, k / block_k) for q's head and
/// `inner` keeps (q, k). Holds a pointer: the layout must outlive the call.
///
/// The key range of a query block runs from its first listed key block to
/// its last, cut to block boundaries, so tiles of block_k keys line up with
/// the blocks; a tile that lies in one block pair is classified with one
/// binary search of the row.
template <class Inner = NoMask>
struct BlockSparseMask : MaskPolicy {
  static constexpr bool always_full = false;
  const BlockSparseLayout* layout = nullptr;
  Inner inner;

  BlockSparseMask bind(const AttentionShape& s) const {
    if (layout == nullptr) detail::fail("block-sparse mask has no layout");
    layout->validate(s.lq, s.lk, s.q_heads);
    return {{}, layout, inner.bind(s)};  // aggregate: Inner need not be default-constructible
  }

  /// The views the inner mask reads (a bool mask nested here is checked
  /// against the outputs like a top-level one).
  template <class F>
  void for_each_view(F&& f) const {
    detail::for_each_view(inner, f);
  }

  bool keep(index_t b, index_t h, index_t q, index_t k) const {
    return inner.keep(b, h, q, k) &&
           layout->contains(h, q / layout->block_q(), k / layout->block_k());
  }

  KeyRange key_range(index_t b, index_t h, index_t q0, index_t q1) const {
    const index_t bk = layout->block_k();
    index_t first = layout->k_blocks(), last = -1;  // listed key blocks of the rows' query blocks
    for (index_t i = q0 / layout->block_q(); i <= (q1 - 1) / layout->block_q(); ++i) {
      const auto r = layout->row(h, i);
      if (r.first == r.second) continue;
      first = std::min(first, *r.first);
      last = std::max(last, *(r.second - 1));
    }
    if (last < 0) return {0, 0};
    const KeyRange ir = inner.key_range(b, h, q0, q1);
    return {std::max(first * bk, ir.begin / bk * bk), std::min((last + 1) * bk, ir.end)};
  }

  /// First key >= k in a key block that a row of [q0, q1) lists (the
  /// engine's hook to jump over unlisted blocks; >= Lk when none is left).
  index_t next_key(index_t, index_t h, index_t q0, index_t q1, index_t k) const {
    const index_t bk = layout->block_k(), j = k / bk;
    index_t next = layout->k_blocks();  // first listed key block >= j over the rows
    for (index_t i = q0 / layout->block_q(); i <= (q1 - 1) / layout->block_q(); ++i) {
      const auto r = layout->row(h, i);
      const index_t* it = std::lower_bound(r.first, r.second, j);
      if (it != r.second) next = std::min(next, *it);
    }
    return next == j ? k : next * bk;
  }

  TileKind classify(index_t b, index_t h, index_t q0, index_t q1, index_t k0, index_t k1) const {
    const index_t bq = layout->block_q(), bk = layout->block_k();
    const index_t i0 = q0 / bq, i1 = (q1 - 1) / bq, j0 = k0 / bk, j1 = (k1 - 1) / bk;
    index_t listed = 0;
    for (index_t i = i0; i <= i1; ++i) {
      const auto r = layout->row(h, i);
      const index_t* lo = std::lower_bound(r.first, r.second, j0);
      const index_t* hi = std::upper_bound(lo, r.second, j1);
      listed += static_cast<index_t>(hi - lo);
    }
    if (listed == 0) return TileKind::empty;
    const TileKind k = inner.classify(b, h, q0, q1, k0, k1);
    if (k == TileKind::empty) return k;
    return listed == (i1 - i0 + 1) * (j1 - j0 + 1) ? k : TileKind::partial;
  }
};

/// The layout as a mask policy for masked_attention (any tile sizes; the
/// layout must outlive the call). sparse_attention is the fast path: it sets
/// the tiles to the blocks.
inline BlockSparseMask<NoMask> block_sparse(const BlockSparseLayout& layout) {
  BlockSparseMask<NoMask> m;
  m.layout = &layout;
  return m;
}

// ------------------------------------------------------------ entry point --

/// Block-sparse attention: query q sees key k iff `layout` lists block
/// (q / block_q, k / block_k) for q's head and `mask` keeps (q, k) (e.g.
/// causal() inside the diagonal blocks, key_padding(...)). `score_mod` as in
/// masked_attention; shapes, types and errors as in
/// scaled_dot_product_attention. The layout must fit the problem
/// (BlockSparseLayout::validate); the engine's tiles are the layout's blocks,
/// so options.block_q / block_k must be 0 or equal to them. Work is
/// O(nnz · block_q · block_k · (D + Dv)); options.stats counts the computed
/// blocks. A row that sees no key outputs zeros and lse -inf.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void sparse_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const BlockSparseLayout& layout, const Mask& mask = {},
                      const Mod& score_mod = {}, const AttentionOptions& options = {}) {
  static_assert(is_mask_v<Mask>, "attn: the mask argument must be a mask policy (attn/mask.hpp)");
  if (options.block_q != 0 && options.block_q != layout.block_q())
    detail::fail("block_q is ", options.block_q, ", but the layout's query blocks have ",
                 layout.block_q(), " rows (leave block_q at 0)");
  if (options.block_k != 0 && options.block_k != layout.block_k())
    detail::fail("block_k is ", options.block_k, ", but the layout's key blocks have ",
                 layout.block_k(), " keys (leave block_k at 0)");
  AttentionOptions opt = options;
  opt.block_q = layout.block_q();
  opt.block_k = layout.block_k();
  const BlockSparseMask<Mask> m{{}, &layout, mask};  // (a capturing lambda has no default)
  detail::check_stats_policy_views(opt.stats, m, score_mod);
  detail::attention_entry(q, k, v, out, m, score_mod, opt);
}

/// Same, with options and no extra mask or score modifier.
template <class Q, class K, class V, class O>
void sparse_attention(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                      const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                      const BlockSparseLayout& layout, const AttentionOptions& options) {
  sparse_attention(q, k, v, out, layout, no_mask(), no_score_mod(), options);
}

}  // namespace attn
