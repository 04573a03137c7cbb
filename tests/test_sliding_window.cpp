// Sliding-window attention against the fp64 reference run with the same
// window written out as a dense boolean mask, window properties, tile counts
// and argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/sliding_window.hpp>

#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace attn_test;

// ------------------------------------------------------------------ helpers --

/// The window of DESIGN.md written out element by element, [1, 1, Lq, Lk]:
/// query i sees key j iff i + (Lk-Lq) - left <= j <= i + (Lk-Lq) + right,
/// a negative bound being unbounded.
struct DenseWindow {
  std::unique_ptr<bool[]> keep;
  attn::TensorView<const bool, 4> view;
  DenseWindow(index_t lq, index_t lk, index_t left, index_t right)
      : keep(new bool[static_cast<std::size_t>(lq * lk)]) {
    for (index_t i = 0; i < lq; ++i)
      for (index_t j = 0; j < lk; ++j) {
        const index_t diag = i + (lk - lq);
        keep[static_cast<std::size_t>(i * lk + j)] =
            (left < 0 || j >= diag - left) && (right < 0 || j <= diag + right);
      }
    view = attn::TensorView<const bool, 4>(keep.get(), {1, 1, lq, lk});
  }
};

/// Runs sliding_window_attention(window(left, right), extra) in T and checks
/// output and log-sum-exp against the fp64 reference with the dense mask.
template <class T, class Extra = attn::NoMask>
void expect_window_matches(const Problem& p, index_t left, index_t right, const Extra& extra = {},
                           attn::AttentionOptions opt = {}, std::uint32_t seed = 7) {
  SCOPED_TRACE(p.str() + " window (" + std::to_string(left) + ", " + std::to_string(right) + ")");
  const Inputs<T> in(p, seed);
  const DenseWindow dense(p.Lq, p.Lk, left, right);
  std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
  const Tensor<double> ref = reference_output(in, p, attn::bool_mask(dense.view) & extra,
                                              attn::no_score_mod(), opt, &lse_ref);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, out.view,
                                 attn::window(left, right), extra, attn::no_score_mod(), opt);
  expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v)));
}

Problem square(index_t n, index_t h = 2) {
  Problem p;
  p.Hq = p.Hkv = h;
  p.Lq = p.Lk = n;
  p.D = p.Dv = 16;
  return p;
}

template <class T>
class SlidingWindow : public ::testing::Test {};
TYPED_TEST_SUITE(SlidingWindow, FloatTypes, StorageTypeNames);

// ------------------------------------------------------ against the reference --

// Window sizes 0, 1, tile - 1, tile, tile + 1 and larger than N, on the left,
// on the right and on both sides, with small tiles (Br = 16, Bc = 32) so that
// every tile kind occurs many times; N = 203 is no multiple of either tile.
TYPED_TEST(SlidingWindow, SizeSweepWithSmallTiles) {
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 32;
  const Problem p = square(203);
  for (index_t w : {0, 1, 15, 16, 17, 31, 32, 33, 250}) {
    expect_window_matches<TypeParam>(p, w, 0, attn::no_mask(), opt);
    expect_window_matches<TypeParam>(p, 0, w, attn::no_mask(), opt);
    expect_window_matches<TypeParam>(p, w, w, attn::no_mask(), opt);
    expect_window_matches<TypeParam>(p, w, -1, attn::no_mask(), opt);
    expect_window_matches<TypeParam>(p, -1, w, attn::no_mask(), opt);
  }
}

// The same around the default tiles (Br = 128, Bc = 256).
TYPED_TEST(SlidingWindow, SizeSweepWithDefaultTiles) {
  const Problem p = square(531, 1);
  for (index_t w : {0, 127, 128, 129, 255, 256, 257, 600})
    expect_window_matches<TypeParam>(p, w, 0);
  expect_window_matches<TypeParam>(p, 129, 255);
  expect_window_matches<TypeParam>(p, 256, 127);
}

TYPED_TEST(SlidingWindow, AsymmetricWindows) {
  attn::AttentionOptions opt;
  opt.block_q = 8;
  opt.block_k = 24;
  const Problem p = square(97);
  for (auto lr :
       std::vector<std::pair<index_t, index_t>>{{3, 40}, {40, 3}, {0, 17}, {25, 1}, {7, 8}})
    expect_window_matches<TypeParam>(p, lr.first, lr.second, attn::no_mask(), opt);
}

// Lq != Lk: the window sits on the bottom-right diagonal. With Lq > Lk the
// first rows see no key for a causal-side window and must output zeros.
TYPED_TEST(SlidingWindow, DifferentQueryAndKeyLengths) {
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 32;
  for (auto lens :
       std::vector<std::pair<index_t, index_t>>{{45, 211}, {211, 45}, {1, 300}, {77, 1}}) {
    Problem p = square(1);
    p.Lq = lens.first;
    p.Lk = lens.second;
    for (auto lr : std::vector<std::pair<index_t, index_t>>{
             {0, 0}, {20, 0}, {33, 5}, {-1, 0}, {0, -1}, {9, 40}})
      expect_window_matches<TypeParam>(p, lr.first, lr.second, attn::no_mask(), opt);
  }
}

TYPED_TEST(SlidingWindow, GroupedHeadsBatchesAndBshdLayout) {
  for (index_t hkv : {4, 2, 1}) {
    Problem p;
    p.B = 2;
    p.Hq = 4;
    p.Hkv = hkv;
    p.Lq = 99;
    p.Lk = 131;
    p.D = 59;
    p.Dv = 24;
    p.layout = hkv == 2 ? Layout::bshd : Layout::bhsd;
    attn::AttentionOptions opt;
    opt.block_q = 32;
    opt.block_k = 64;
    expect_window_matches<TypeParam>(p, 40, 10, attn::no_mask(), opt);
  }
}

// Composes with key padding and with a causal mask (which cuts the right side).
TYPED_TEST(SlidingWindow, ComposesWithKeyPaddingAndCausal) {
  Problem p = square(150);
  p.B = 3;
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 32;
  expect_window_matches<TypeParam>(p, 30, 30, attn::key_padding({150, 61, 1}), opt);
  expect_window_matches<TypeParam>(p, 30, 30, attn::causal(), opt);
  expect_window_matches<TypeParam>(p, 30, 30, attn::causal() & attn::key_padding({7, 150, 100}),
                                   opt);
}

// The window also works as a plain mask policy in masked_attention, with a score modifier.
TYPED_TEST(SlidingWindow, IsAMaskPolicyForMaskedAttention) {
  Problem p = square(140);
  expect_matches_reference<TypeParam>(p, attn::window(20, 3), attn::softcap(5.0));
}

// ------------------------------------------------------------- properties --

// window(unbounded, 0) is causal and window(unbounded, unbounded) is dense:
// same engine, same tiles, so the same bits.
TYPED_TEST(SlidingWindow, UnboundedLeftZeroRightEqualsCausal) {
  for (auto lens : std::vector<std::pair<index_t, index_t>>{{300, 300}, {100, 333}, {333, 100}}) {
    Problem p = square(1);
    p.Lq = lens.first;
    p.Lk = lens.second;
    const Inputs<TypeParam> in(p, 5);
    Tensor<TypeParam> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv), c(p.B, p.Hq, p.Lq, p.Dv),
        d(p.B, p.Hq, p.Lq, p.Dv);
    attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, a.view, attn::window(-1, 0));
    attn::masked_attention(in.q.view, in.k.view, in.v.view, b.view, attn::causal());
    EXPECT_EQ(a.buf, b.buf);
    attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, c.view, attn::window(-1, -1));
    attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, d.view);
    EXPECT_EQ(c.buf, d.buf);
  }
}

// A bound far beyond the sequence (even near the index type's limit) is unbounded.
TYPED_TEST(SlidingWindow, HugeBoundsAreUnbounded) {
  const Problem p = square(70);
  const Inputs<TypeParam> in(p, 9);
  Tensor<TypeParam> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
  const index_t huge = std::numeric_limits<index_t>::max();
  attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, a.view, attn::window(huge, huge));
  attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, b.view);
  EXPECT_EQ(a.buf, b.buf);
}

// row_keys is exactly the set of keys keep() admits, one interval per row
// (the engine masks partial tiles with it).
TEST(WindowPolicy, RowKeysAreExactlyTheKeptKeys) {
  for (auto lens : std::vector<std::pair<index_t, index_t>>{{40, 40}, {13, 50}, {50, 13}})
    for (auto lr : std::vector<std::pair<index_t, index_t>>{
             {0, 0}, {5, 0}, {0, 7}, {-1, 3}, {4, -1}, {-1, -1}, {100, 100}}) {
      attn::AttentionShape s;
      s.batch = s.q_heads = s.kv_heads = 1;
      s.lq = lens.first;
      s.lk = lens.second;
      s.d = s.dv = 4;
      const attn::Window w = attn::window(lr.first, lr.second).bind(s);
      for (index_t q = 0; q < s.lq; ++q) {
        const attn::KeyRange r = w.row_keys(0, 0, q);
        for (index_t k = 0; k < s.lk; ++k)
          ASSERT_EQ(w.keep(0, 0, q, k), r.begin <= k && k < r.end)
              << "Lq " << s.lq << " Lk " << s.lk << " window (" << lr.first << ", " << lr.second
              << ") q " << q << " k " << k;
      }
    }
}

// ------------------------------------------------------------- tile counts --

attn::AttentionStats window_stats(index_t n, index_t left, index_t right, index_t br, index_t bc) {
  Problem p = square(n, 1);
  p.D = p.Dv = 4;
  const Inputs<float> in(p, 3);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.block_q = br;
  opt.block_k = bc;
  opt.stats = &stats;
  attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, out.view,
                                 attn::window(left, right), opt);
  return stats;
}

// Only the band is visited: every kept score is computed, and no more than
// the band widened by one tile on each side: Lq · (left + right + 1 + Br + Bc)
// scores. Doubling N doubles the work (up to the edge tiles), where dense
// attention would quadruple it.
TEST(SlidingWindowStats, WorkIsLinearInSequenceLength) {
  const index_t br = 32, bc = 64, left = 100, right = 20;
  for (index_t n : {1000, 2000, 4000}) {
    SCOPED_TRACE("N = " + std::to_string(n));
    const attn::AttentionStats s = window_stats(n, left, right, br, bc);
    index_t kept = 0;
    for (index_t i = 0; i < n; ++i)
      kept += std::min(n - 1, i + right) - std::max<index_t>(0, i - left) + 1;
    EXPECT_GE(s.scores, kept);
    EXPECT_LE(s.scores, n * (left + right + 1 + br + bc));
    EXPECT_EQ(s.skipped_tiles, 0);  // the key range is the band, so no visited tile is empty
    EXPECT_GT(s.full_tiles, 0);     // tiles inside the band pay no per-element test
  }
  const attn::AttentionStats s1 = window_stats(2000, left, right, br, bc);
  const attn::AttentionStats s2 = window_stats(4000, left, right, br, bc);
  const index_t tiles1 = s1.full_tiles + s1.partial_tiles,
                tiles2 = s2.full_tiles + s2.partial_tiles;
  const index_t edge =
      (left + right + br) / bc + 2;  // key tiles of one query tile: the edges differ
  EXPECT_LE(tiles2, 2 * tiles1 + edge);
  EXPECT_GE(tiles2, 2 * tiles1 - edge);
}

// A diagonal-only window computes exactly one or two key tiles per query tile.
TEST(SlidingWindowStats, DiagonalWindowVisitsAtMostTwoTilesPerQueryTile) {
  const attn::AttentionStats s = window_stats(1000, 0, 0, 50, 50);
  EXPECT_GE(s.full_tiles + s.partial_tiles, 20);  // 1000 / 50 query tiles
  EXPECT_LE(s.full_tiles + s.partial_tiles, 40);
  EXPECT_GE(s.scores, 1000);
}

// ------------------------------------------------------------------ errors --

// The window itself cannot be wrong (every integer pair has a meaning), so
// the errors are the shared argument checks, raised before anything is written.
TEST(SlidingWindowErrors, BadShapesThrowBeforeWriting) {
  Problem p = square(20);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq + 1, p.Dv);
  for (auto& x : out.buf) x = 42.f;
  try {
    attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, out.view, attn::window(3, 3));
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("out has shape [1, 2, 21, 16], expected [1, 2, 20, 16]"),
              std::string::npos)
        << e.what();
  }
  for (float x : out.buf) ASSERT_EQ(x, 42.f);

  Tensor<float> ok(p.B, p.Hq, p.Lq, p.Dv);
  for (auto& x : ok.buf) x = 42.f;
  try {
    attn::sliding_window_attention(in.q.view, in.k.view, in.v.view, ok.view, attn::window(3, 3),
                                   attn::key_padding({5, 6}));
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("key_padding has 2 lengths, but the batch is 1"),
              std::string::npos)
        << e.what();
  }
  for (float x : ok.buf) ASSERT_EQ(x, 42.f);
}

}  // namespace
