// Block-sparse attention against the fp64 reference run with the layout
// written out as a dense boolean mask; layout builders and their
// properties; tile counts; argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/sparse.hpp>

#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace attn_test;
using attn::BlockSparseLayout;

// ------------------------------------------------------------------ helpers --

/// The layout written out element by element from its compressed rows,
/// [1, H or 1, Lq, Lk]: (q, k) is true iff the row of block q / block_q lists
/// block k / block_k.
struct DenseLayout {
  std::unique_ptr<bool[]> keep;
  attn::TensorView<const bool, 4> view;
  DenseLayout(const BlockSparseLayout& l, index_t lq, index_t lk) {
    const index_t heads = l.heads();
    keep.reset(new bool[static_cast<std::size_t>(heads * lq * lk)]());
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < l.q_blocks(); ++i) {
        const std::size_t r = static_cast<std::size_t>(h * l.q_blocks() + i);
        for (index_t e = l.row_offsets()[r]; e < l.row_offsets()[r + 1]; ++e) {
          const index_t j = l.cols()[static_cast<std::size_t>(e)];
          for (index_t q = i * l.block_q(); q < std::min(lq, (i + 1) * l.block_q()); ++q)
            for (index_t k = j * l.block_k(); k < std::min(lk, (j + 1) * l.block_k()); ++k)
              keep[static_cast<std::size_t>((h * lq + q) * lk + k)] = true;
        }
      }
    view = attn::TensorView<const bool, 4>(keep.get(), {1, heads, lq, lk});
  }
  bool at(index_t h, index_t q, index_t k) const {
    return keep[static_cast<std::size_t>((h * view.extent(2) + q) * view.extent(3) + k)];
  }
};

/// Runs sparse_attention(layout, extra) in T and checks output and
/// log-sum-exp against the fp64 reference with the dense mask.
template <class T, class Extra = attn::NoMask>
void expect_sparse_matches(const Problem& p, const BlockSparseLayout& layout,
                           const Extra& extra = {}, std::uint32_t seed = 7) {
  SCOPED_TRACE(p.str() + " blocks " + std::to_string(layout.block_q()) + "x" +
               std::to_string(layout.block_k()));
  const Inputs<T> in(p, seed);
  const DenseLayout dense(layout, p.Lq, p.Lk);
  std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
  const Tensor<double> ref = reference_output(in, p, attn::bool_mask(dense.view) & extra,
                                              attn::no_score_mod(), {}, &lse_ref);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  attn::AttentionOptions opt;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  attn::sparse_attention(in.q.view, in.k.view, in.v.view, out.view, layout, extra,
                         attn::no_score_mod(), opt);
  expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v)));
}

Problem square(index_t n, index_t h = 2) {
  Problem p;
  p.Hq = p.Hkv = h;
  p.Lq = p.Lk = n;
  p.D = p.Dv = 16;
  return p;
}

/// A seeded random block mask with about `density` of the blocks set.
std::vector<bool> random_block_mask(index_t count, double density, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::bernoulli_distribution bit(density);
  std::vector<bool> m(static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < m.size(); ++i) m[i] = bit(gen);
  return m;
}

/// The key blocks query block i of head h lists.
std::vector<index_t> row_of(const BlockSparseLayout& l, index_t h, index_t i) {
  const auto r = l.row(h, i);
  return {r.first, r.second};
}

template <class T>
class Sparse : public ::testing::Test {};
TYPED_TEST_SUITE(Sparse, FloatTypes, StorageTypeNames);

// ------------------------------------------------------ against the reference --

// Every builder, on a length (203) that is no multiple of the block (16):
// the last block is short.
TYPED_TEST(Sparse, BuildersMatchReference) {
  const index_t n = 203, b = 16;
  const Problem p = square(n);
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::local(n, b, 1, 1));
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::local(n, b, 2, 0));
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::local(n, b, 0, -1));
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::global(n, b, {0, 12}));
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::random(n, b, 3, 11));
  attn::BigBirdConfig bb;
  bb.block = b;
  expect_sparse_matches<TypeParam>(p, attn::bigbird(n, bb));
  attn::LongformerConfig lf;
  lf.block = b;
  lf.window = 64;
  expect_sparse_matches<TypeParam>(p, attn::longformer(n, {0, 100, 202}, lf));
}

// Block sizes 1 and the whole sequence, and unequal query and key blocks.
TYPED_TEST(Sparse, ExtremeAndUnequalBlockSizes) {
  const Problem p = square(37, 1);
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::local(37, 1, 3, 2));
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::local(37, 64, 0, 0));
  const index_t qb = (37 + 4) / 5, kb = (37 + 10) / 11;
  expect_sparse_matches<TypeParam>(
      p, BlockSparseLayout::from_block_mask(5, 11, qb, kb, random_block_mask(qb * kb, 0.4, 2)));
}

// Lq != Lk (cross attention) from an explicit block mask, both ways round;
// some query blocks list nothing and must output zeros.
TYPED_TEST(Sparse, DifferentQueryAndKeyLengths) {
  for (auto lens : std::vector<std::pair<index_t, index_t>>{{45, 211}, {211, 45}}) {
    Problem p = square(1);
    p.Lq = lens.first;
    p.Lk = lens.second;
    const index_t bq = 16, bk = 32, qb = (p.Lq + bq - 1) / bq, kb = (p.Lk + bk - 1) / bk;
    std::vector<bool> mask = random_block_mask(qb * kb, 0.5, 4);
    for (index_t j = 0; j < kb; ++j)
      mask[static_cast<std::size_t>(j)] = false;  // query block 0 sees nothing
    expect_sparse_matches<TypeParam>(p, BlockSparseLayout::from_block_mask(bq, bk, qb, kb, mask));
  }
}

// Per-head layouts with grouped key/value heads and the bshd layout.
TYPED_TEST(Sparse, PerHeadLayoutsWithGroupedHeads) {
  Problem p;
  p.B = 2;
  p.Hq = 4;
  p.Hkv = 2;
  p.Lq = p.Lk = 150;
  p.D = 59;
  p.Dv = 24;
  p.layout = Layout::bshd;
  expect_sparse_matches<TypeParam>(p, BlockSparseLayout::random(150, 32, 2, 5, 4));
  attn::BigBirdConfig bb;
  bb.block = 16;
  bb.heads = 4;
  expect_sparse_matches<TypeParam>(p, attn::bigbird(150, bb));
}

// Per-element masks compose on top: causal inside the diagonal blocks, key padding.
TYPED_TEST(Sparse, ComposesWithCausalAndKeyPadding) {
  Problem p = square(203);
  p.B = 3;
  attn::BigBirdConfig bb;
  bb.block = 16;
  const BlockSparseLayout layout = attn::bigbird(203, bb);
  expect_sparse_matches<TypeParam>(p, layout, attn::causal());
  expect_sparse_matches<TypeParam>(p, layout, attn::key_padding({203, 70, 1}));
  expect_sparse_matches<TypeParam>(p, layout, attn::causal() & attn::key_padding({100, 203, 17}));
}

// The layout as a mask policy in masked_attention, with tiles that do not
// match the blocks (each tile then spans several blocks).
TYPED_TEST(Sparse, LayoutIsAMaskPolicyForAnyTiles) {
  const Problem p = square(130);
  const BlockSparseLayout layout =
      BlockSparseLayout::random(130, 8, 4, 3) | BlockSparseLayout::local(130, 8, 1, 0);
  attn::AttentionOptions opt;
  opt.block_q = 20;
  opt.block_k = 36;
  const DenseLayout dense(layout, p.Lq, p.Lk);
  const Inputs<TypeParam> in(p, 3);
  const Tensor<double> ref =
      reference_output(in, p, attn::bool_mask(dense.view), attn::no_score_mod());
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::block_sparse(layout),
                         opt);
  EXPECT_LE(max_abs_diff(out, ref), tolerance<TypeParam>(p.D, p.Lk, max_abs(in.v)));
}

// ------------------------------------------------------------- properties --

// A layout listing every block is dense attention, and every tile is full.
TYPED_TEST(Sparse, EveryBlockEqualsDense) {
  Problem p = square(203);
  p.Hkv = 1;
  const index_t bq = 32, bk = 64, qb = 7, kb = 4;
  const BlockSparseLayout full =
      BlockSparseLayout::from_block_mask(bq, bk, qb, kb, std::vector<bool>(qb * kb, true));
  EXPECT_EQ(full.nnz(), qb * kb);
  expect_matches_reference<TypeParam>(p, attn::no_mask());  // the dense path itself
  expect_sparse_matches<TypeParam>(p, full);
  const Inputs<TypeParam> in(p, 7);
  Tensor<TypeParam> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  attn::sparse_attention(in.q.view, in.k.view, in.v.view, out.view, full, opt);
  EXPECT_EQ(stats.full_tiles, p.Hq * qb * kb);
  EXPECT_EQ(stats.partial_tiles, 0);
  EXPECT_EQ(stats.skipped_tiles, 0);
  EXPECT_EQ(stats.scores, p.Hq * p.Lq * p.Lk);
  // Same engine and tiles as dense attention with block_q × block_k tiles: same bits.
  Tensor<TypeParam> dense(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionOptions tiles;
  tiles.block_q = bq;
  tiles.block_k = bk;
  attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, dense.view, tiles);
  EXPECT_EQ(out.buf, dense.buf);
}

// The union of layouts lists exactly the OR of their blocks, and attention
// with it matches the reference with the OR of their dense masks.
TEST(SparseLayout, UnionIsTheOrOfMasks) {
  const index_t bq = 8, bk = 16, qb = 9, kb = 6;
  const std::vector<bool> ma = random_block_mask(qb * kb, 0.3, 1);
  const std::vector<bool> mb = random_block_mask(2 * qb * kb, 0.3, 2);
  const BlockSparseLayout a = BlockSparseLayout::from_block_mask(bq, bk, qb, kb, ma);
  const BlockSparseLayout b =
      BlockSparseLayout::from_block_mask(bq, bk, qb, kb, mb, 2);  // per head
  const BlockSparseLayout u = a | b;
  ASSERT_EQ(u.heads(), 2);
  index_t listed = 0;
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < qb; ++i)
      for (index_t j = 0; j < kb; ++j) {
        const bool want = ma[static_cast<std::size_t>(i * kb + j)] ||
                          mb[static_cast<std::size_t>((h * qb + i) * kb + j)];
        EXPECT_EQ(u.contains(h, i, j), want) << h << " " << i << " " << j;
        listed += want ? 1 : 0;
      }
  EXPECT_EQ(u.nnz(), listed);

  Problem p =
      square(70);  // 70 rows in 9 blocks of 8, 70 keys in 5 blocks of 16: too few key blocks
  EXPECT_THROW(u.validate(p.Lq, p.Lk, p.Hq), attn::Error);
  p.Lk = 90;  // 6 key blocks
  const DenseLayout da(a, p.Lq, p.Lk), db(b, p.Lq, p.Lk), du(u, p.Lq, p.Lk);
  for (index_t h = 0; h < 2; ++h)
    for (index_t q = 0; q < p.Lq; ++q)
      for (index_t k = 0; k < p.Lk; ++k)
        ASSERT_EQ(du.at(h, q, k), da.at(0, q, k) || db.at(h, q, k));
  expect_sparse_matches<double>(p, u);
}

TEST(SparseLayout, RandomIsReproducibleFromTheSeed) {
  const BlockSparseLayout a = BlockSparseLayout::random(5000, 64, 3, 42, 2);
  const BlockSparseLayout b = BlockSparseLayout::random(5000, 64, 3, 42, 2);
  const BlockSparseLayout c = BlockSparseLayout::random(5000, 64, 3, 43, 2);
  EXPECT_EQ(a.row_offsets(), b.row_offsets());
  EXPECT_EQ(a.cols(), b.cols());
  EXPECT_NE(a.cols(), c.cols());
  EXPECT_NE(row_of(a, 0, 5), row_of(a, 1, 5))
      << "heads draw independently";  // 1 in C(79, 3) to fail
  EXPECT_EQ(a.nnz(), 2 * 79 * 3);     // ceil(5000 / 64) = 79 rows per head, 3 distinct blocks each
  // Fewer candidates than asked: every block.
  const BlockSparseLayout all = BlockSparseLayout::random(100, 10, 50, 1);
  EXPECT_EQ(all.nnz(), 100);
}

TEST(SparseLayout, BigBirdStructure) {
  const index_t n = 20;
  attn::BigBirdConfig cfg;  // block 64, window 3, global 2 (first and last), random 3
  const BlockSparseLayout l = attn::bigbird(n * 64 - 5, cfg);
  ASSERT_EQ(l.q_blocks(), n);
  EXPECT_EQ(l.block_q(), 64);
  for (index_t i = 0; i < n; ++i) {
    const std::vector<index_t> row = row_of(l, 0, i);
    if (i == 0 || i == n - 1) {
      EXPECT_EQ(static_cast<index_t>(row.size()), n) << "global block " << i << " sees every block";
      continue;
    }
    std::vector<index_t> fixed = {0, n - 1};                      // global
    for (index_t j = i - 1; j <= i + 1; ++j) fixed.push_back(j);  // window
    std::sort(fixed.begin(), fixed.end());
    fixed.erase(std::unique(fixed.begin(), fixed.end()), fixed.end());
    for (index_t j : fixed) EXPECT_TRUE(l.contains(0, i, j)) << i << " " << j;
    EXPECT_EQ(row.size(), fixed.size() + 3)
        << "3 random blocks outside window and globals, row " << i;
  }
  cfg.seed = 1;
  EXPECT_NE(attn::bigbird(n * 64, cfg).cols(), l.cols());
  // nnz grows linearly: 2 global rows of n blocks; rows 1 and n - 2, whose
  // window touches a global block, 4 + 3; the others 3 + 2 + 3.
  const index_t big = 1000;
  EXPECT_EQ(attn::bigbird(big * 64).nnz(), 2 * big + 2 * 7 + (big - 4) * 8);
}

TEST(SparseLayout, LongformerStructure) {
  // Default window 512 = 256 on each side = 4 blocks of 64; token 700 lies in block 10.
  const BlockSparseLayout l = attn::longformer(64 * 30, {700});
  for (index_t i = 0; i < 30; ++i)
    for (index_t j = 0; j < 30; ++j)
      EXPECT_EQ(l.contains(0, i, j), std::abs(i - j) <= 4 || i == 10 || j == 10) << i << " " << j;
}

TEST(SparseLayout, LocalMatchesItsDefinition) {
  const BlockSparseLayout l = BlockSparseLayout::local(1000, 100, 2, 1);
  for (index_t i = 0; i < 10; ++i)
    for (index_t j = 0; j < 10; ++j) EXPECT_EQ(l.contains(0, i, j), i - 2 <= j && j <= i + 1);
}

// ------------------------------------------------------------- tile counts --

attn::AttentionStats sparse_stats(const BlockSparseLayout& l, index_t n) {
  Problem p = square(n, 1);
  p.D = p.Dv = 4;
  const Inputs<float> in(p, 3);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  attn::sparse_attention(in.q.view, in.k.view, in.v.view, out.view, l, opt);
  return stats;
}

// Each listed block is one computed tile, and nothing else is computed.
TEST(SparseStats, ComputedTilesAreTheListedBlocks) {
  attn::BigBirdConfig cfg;
  cfg.block = 32;
  for (index_t n : {1024, 2048, 4096}) {
    const BlockSparseLayout l = attn::bigbird(n, cfg);
    const attn::AttentionStats s = sparse_stats(l, n);
    EXPECT_EQ(s.full_tiles, l.nnz());
    EXPECT_EQ(s.partial_tiles, 0);
    EXPECT_EQ(s.scores, l.nnz() * 32 * 32);
    // The first and last key blocks are global, so every row's key range is
    // the whole sequence: whatever is not computed there is skipped.
    EXPECT_EQ(s.full_tiles + s.skipped_tiles, l.q_blocks() * l.k_blocks());
  }
}

// ------------------------------------------------------------------ errors --

/// Runs f, expects attn::Error whose message contains `what`.
template <class F>
void expect_error(F f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error, expected: " << what;
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(SparseErrors, BadLayoutsNameTheNumbers) {
  expect_error([] { BlockSparseLayout::local(100, 0, 1, 1); }, "block size is 0, must be > 0");
  expect_error([] { BlockSparseLayout::random(0, 16, 1, 1); }, "seq_len is 0, must be > 0");
  expect_error([] { BlockSparseLayout::global(100, 16, {7}); }, "global block 7 is outside [0, 7)");
  expect_error(
      [] {
        BlockSparseLayout(16, 16, 2, 5, 1, {0, 1, 2}, {3, 5});
      },
      "head 0 query block 1 lists key block 5, outside [0, 5)");
  expect_error(
      [] {
        BlockSparseLayout(16, 16, 1, 5, 1, {0, 2}, {3, 1});
      },
      "lists key block 1 after 3 (must be sorted and distinct)");
  expect_error(
      [] {
        BlockSparseLayout(16, 16, 2, 5, 1, {0, 1}, {3});
      },
      "has 2 row offsets, expected heads · q_blocks + 1 = 3");
  expect_error(
      [] {
        BlockSparseLayout(16, 16, 2, 5, 1, {0, 10, 2}, {1, 2});
      },
      "row offsets decrease at row 1: 10 then 2");
  expect_error([] { BlockSparseLayout::from_block_mask(8, 0, 2, 2, std::vector<bool>(4, true)); },
               "block_k is 0, must be > 0");
  expect_error([] { BlockSparseLayout::from_block_mask(8, 8, 2, 2, std::vector<bool>(5, true)); },
               "block mask has 5 entries, expected heads · q_blocks · k_blocks = 1 · 2 · 2 = 4");
  expect_error(
      [] {
        (void)(BlockSparseLayout::local(100, 16, 1, 1) | BlockSparseLayout::local(100, 32, 1, 1));
      },
      "different grids: 7×7 blocks of 16×16 and 4×4 blocks of 32×32");
  attn::BigBirdConfig bb;
  bb.window_blocks = 2;
  expect_error([&] { attn::bigbird(1000, bb); }, "bigbird window_blocks is 2, must be odd");
  attn::LongformerConfig lf;
  lf.window = 100;
  expect_error([&] { attn::longformer(1000, {}, lf); },
               "longformer window is 100, must be a non-negative multiple of 2 · block = 128");
  expect_error([] { attn::longformer(1000, {1000}); },
               "longformer global token 1000 is outside [0, seq_len = 1000)");
}

// A layout that does not fit the call is rejected before the output is written.
TEST(SparseErrors, LayoutForAnotherProblemLeavesOutputUnchanged) {
  const Problem p = square(100, 2);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  for (auto& x : out.buf) x = 42.f;
  auto run = [&](const BlockSparseLayout& l, attn::AttentionOptions opt = {}) {
    return
        [&, l, opt] { attn::sparse_attention(in.q.view, in.k.view, in.v.view, out.view, l, opt); };
  };
  expect_error(run(BlockSparseLayout::local(64, 16, 1, 1)),
               "layout has 4 query blocks of 16 rows, but Lq = 100 needs 7");
  const index_t qb = 7;
  expect_error(
      run(BlockSparseLayout::from_block_mask(16, 16, qb, 3, std::vector<bool>(qb * 3, true))),
      "layout has 3 key blocks of 16 keys, but Lk = 100 needs 7");
  expect_error(run(BlockSparseLayout::random(100, 16, 2, 1, 3)),
               "layout has 3 heads, but q has 2 heads");
  attn::AttentionOptions opt;
  opt.block_q = 32;
  expect_error(run(BlockSparseLayout::local(100, 16, 1, 1), opt),
               "block_q is 32, but the layout's query blocks have 16 rows");
  expect_error(run(BlockSparseLayout()), "block-sparse layout is empty");
  for (float x : out.buf) ASSERT_EQ(x, 42.f);
}

}  // namespace
