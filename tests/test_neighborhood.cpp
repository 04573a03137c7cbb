// Neighbourhood attention: windows against NATTEN's rule written out by hand,
// masked_attention(neighborhood) and neighborhood_attention against the fp64
// reference run with the same neighbourhood as a dense boolean mask, tile
// skipping, and argument errors.
#include "support.hpp"
#include "type_names.hpp"

#include <attn/ops/neighborhood.hpp>
#include <attn/policy/neighborhood.hpp>
#include <attn/policy/relative_bias_2d.hpp>

#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

/// The window of coordinate i along one dimension, by listing its group
/// (the points ≡ i mod dil) and sliding K of them so that i is as central as
/// the border allows: NATTEN's rule, written independently of the library.
std::set<index_t> window_1d(index_t n, index_t K, index_t dil, index_t i) {
  std::vector<index_t> group;
  for (index_t p = i % dil; p < n; p += dil) group.push_back(p);
  const index_t pos = i / dil, m = static_cast<index_t>(group.size());
  index_t s = pos - K / 2;
  if (s < 0) s = 0;
  if (s + K > m) s = m - K;
  return std::set<index_t>(group.begin() + s, group.begin() + s + K);
}

/// The neighbourhood as a dense [1, 1, N, N] boolean mask.
struct DenseNeighborhood {
  std::unique_ptr<bool[]> keep;
  attn::TensorView<const bool, 4> view;
  index_t n = 1;
  DenseNeighborhood(const std::vector<index_t>& grid, const std::vector<index_t>& K,
                    const std::vector<index_t>& dil) {
    for (index_t g : grid) n *= g;
    keep.reset(new bool[static_cast<std::size_t>(n * n)]);
    const int dims = static_cast<int>(grid.size());
    auto coord = [&](index_t t, int d) {
      index_t pitch = 1;
      for (int e = dims - 1; e > d; --e) pitch *= grid[static_cast<std::size_t>(e)];
      return (t / pitch) % grid[static_cast<std::size_t>(d)];
    };
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < n; ++j) {
        bool ok = true;
        for (int d = 0; d < dims; ++d) {
          const auto e = static_cast<std::size_t>(d);
          const auto w = window_1d(grid[e], K.size() == 1 ? K[0] : K[e],
                                   dil.size() == 1 ? dil[0] : dil[e], coord(i, d));
          ok = ok && w.count(coord(j, d)) > 0;
        }
        keep[static_cast<std::size_t>(i * n + j)] = ok;
      }
    view = attn::TensorView<const bool, 4>(keep.get(), {1, 1, n, n});
  }
};

TEST(NeighborhoodWindow, ShiftsInwardAtBordersByHand) {
  EXPECT_EQ(window_1d(7, 3, 1, 0), (std::set<index_t>{0, 1, 2}));
  EXPECT_EQ(window_1d(7, 3, 1, 3), (std::set<index_t>{2, 3, 4}));
  EXPECT_EQ(window_1d(7, 3, 1, 6), (std::set<index_t>{4, 5, 6}));
  EXPECT_EQ(window_1d(8, 3, 2, 7), (std::set<index_t>{3, 5, 7}));
  EXPECT_EQ(window_1d(8, 3, 2, 0), (std::set<index_t>{0, 2, 4}));
  // The library's windows, 1-D length 7 kernel 3: query 0 sees 0..2, query 6 sees 4..6.
  attn::AttentionShape s;
  s.batch = 1, s.q_heads = 1, s.kv_heads = 1, s.lq = 7, s.lk = 7, s.d = 1, s.dv = 1;
  const auto m = attn::neighborhood({7}, 3).bind(s);
  for (index_t k = 0; k < 7; ++k) {
    EXPECT_EQ(m.keep(0, 0, 0, k), k <= 2) << k;
    EXPECT_EQ(m.keep(0, 0, 6, k), k >= 4) << k;
    EXPECT_EQ(m.keep(0, 0, 3, k), k >= 2 && k <= 4) << k;
  }
}

// Every query sees exactly prod(kernel) keys; keep, classify and key_range
// agree with the dense mask on every tile.
TEST(NeighborhoodPolicy, AgreesWithDenseMaskEverywhere) {
  struct Case {
    std::vector<index_t> grid, K, dil;
  };
  for (const Case& c : std::vector<Case>{{{40}, {5}, {1}},
                                         {{41}, {4}, {3}},
                                         {{9, 11}, {3, 5}, {1, 2}},
                                         {{8, 8}, {7}, {1}},
                                         {{4, 5, 6}, {3, 3, 5}, {1, 1, 1}},
                                         {{5, 4, 9}, {2, 3, 3}, {2, 1, 3}}}) {
    const DenseNeighborhood dense(c.grid, c.K, c.dil);
    const index_t n = dense.n;
    attn::AttentionShape s;
    s.batch = 1, s.q_heads = 1, s.kv_heads = 1, s.lq = n, s.lk = n, s.d = 1, s.dv = 1;
    const auto m = attn::neighborhood(c.grid, c.K, c.dil).bind(s);
    index_t expect_count = 1;
    for (std::size_t d = 0; d < c.grid.size(); ++d)
      expect_count *= c.K.size() == 1 ? c.K[0] : c.K[d];
    for (index_t i = 0; i < n; ++i) {
      index_t seen = 0;
      for (index_t j = 0; j < n; ++j) {
        const bool want = dense.keep[static_cast<std::size_t>(i * n + j)];
        ASSERT_EQ(m.keep(0, 0, i, j), want) << i << " " << j;
        seen += want;
      }
      ASSERT_EQ(seen, expect_count);
      ASSERT_EQ(m.count(i, 0, n), expect_count);
    }
    for (index_t br : {1, 3, 16})
      for (index_t bc : {1, 5, 32})
        for (index_t q0 = 0; q0 < n; q0 += br)
          for (index_t k0 = 0; k0 < n; k0 += bc) {
            const index_t q1 = std::min(n, q0 + br), k1 = std::min(n, k0 + bc);
            index_t kept = 0;
            for (index_t i = q0; i < q1; ++i)
              for (index_t j = k0; j < k1; ++j)
                kept += dense.keep[static_cast<std::size_t>(i * n + j)];
            const attn::TileKind want = kept == 0                       ? attn::TileKind::empty
                                        : kept == (q1 - q0) * (k1 - k0) ? attn::TileKind::full
                                                                        : attn::TileKind::partial;
            ASSERT_EQ(m.classify(0, 0, q0, q1, k0, k1), want);
            const attn::KeyRange r = m.key_range(0, 0, q0, q1);
            if (kept > 0) {  // visible keys lie inside the range
              ASSERT_TRUE(r.begin < k1 && k0 < r.end);
            }
          }
  }
}

// ----------------------------------------------------------- attention --

template <class T>
class NeighborhoodAttention : public ::testing::Test {};
TYPED_TEST_SUITE(NeighborhoodAttention, FloatTypes, StorageTypeNames);

TYPED_TEST(NeighborhoodAttention, BothPathsMatchDenseMaskReference) {
  using T = TypeParam;
  struct Case {
    std::vector<index_t> grid, K, dil;
    index_t B, Hq, Hkv, D, Dv;
    Layout layout;
  };
  for (const Case& c : std::vector<Case>{{{300}, {7}, {1}, 1, 2, 1, 16, 16, Layout::bhsd},
                                         {{129}, {5}, {3}, 2, 2, 2, 17, 9, Layout::bshd},
                                         {{13, 17}, {5}, {1}, 1, 4, 2, 33, 33, Layout::bhsd},
                                         {{16, 16}, {3, 5}, {2, 1}, 2, 2, 1, 8, 11, Layout::bshd},
                                         {{5, 6, 7}, {3}, {1}, 1, 2, 2, 16, 16, Layout::bhsd}}) {
    const DenseNeighborhood dense(c.grid, c.K, c.dil);
    const Problem p = make(c.B, c.Hq, c.Hkv, dense.n, dense.n, c.D, c.Dv, c.layout);
    SCOPED_TRACE(p.str());
    const auto nb = attn::neighborhood(c.grid, c.K, c.dil);
    for (index_t bq : {0, 16, 31})
      for (index_t bk : {0, 24}) {
        attn::AttentionOptions opt;
        opt.block_q = bq;
        opt.block_k = bk;
        const Inputs<T> in(p, 3);
        std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
        const Tensor<double> ref = reference_output(in, p, attn::bool_mask(dense.view),
                                                    attn::no_score_mod(), opt, &lse_ref);
        opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
        const double tol = tolerance<T>(p.D, p.Lk, max_abs(in.v));
        Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
        attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, nb, opt);
        expect_close(out, ref, lse, lse_ref, tol);
        Tensor<T> fast(p.B, p.Hq, p.Lq, p.Dv, p.layout);
        attn::neighborhood_attention(in.q.view, in.k.view, in.v.view, fast.view, nb, opt);
        expect_close(fast, ref, lse, lse_ref, tol);
      }
  }
}

// With a 2-D relative bias and an extra key-padding mask (rows may see no key).
TYPED_TEST(NeighborhoodAttention, WithRelativeBiasAndExtraMask) {
  using T = TypeParam;
  const index_t gh = 9, gw = 10, n = gh * gw, H = 2;
  const DenseNeighborhood dense({gh, gw}, {3}, {1});
  const Problem p = make(2, H, H, n, n, 16, 16);
  std::vector<double> table(static_cast<std::size_t>((2 * gh - 1) * (2 * gw - 1) * H));
  std::mt19937 gen(1);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (auto& x : table) x = dist(gen);
  const auto bias = attn::relative_bias_2d(table, gh, gw);
  const auto pad = attn::key_padding({n, 20});  // batch 1: keys 0..19 only (some rows see none)
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 32;
  const Inputs<T> in(p, 2);
  std::vector<float> lse_ref, lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq));
  const Tensor<double> ref =
      reference_output(in, p, attn::bool_mask(dense.view) & pad, bias, opt, &lse_ref);
  opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::neighborhood_attention(in.q.view, in.k.view, in.v.view, out.view,
                               attn::neighborhood({gh, gw}, 3), pad, bias, opt);
  expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v), 8.0));
}

/// Scores computed per query by 7 × 7 neighbourhood attention on a grid of
/// rows × cols tokens (options.stats), with block_q rows per query tile (0:
/// the default).
double scores_per_query(index_t rows, index_t cols, index_t block_q) {
  const index_t n = rows * cols;
  const Problem p = make(1, 1, 1, n, n, 8, 8);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  opt.block_q = block_q;
  attn::neighborhood_attention(in.q.view, in.k.view, in.v.view, out.view,
                               attn::neighborhood({rows, cols}, 7), opt);
  return static_cast<double>(stats.scores) / static_cast<double>(n);
}

// Work is O(N·K²): on a 64 × 64 grid with 7 × 7 windows, each query tile
// computes at most ceil((7·64 + 128)/256) + 1 key tiles of 256, and the
// computed scores per query grow linearly, not with N.
TEST(NeighborhoodStats, WorkIsLinearInPixels) {
  std::vector<double> per_query;
  for (index_t side : {32, 64, 128}) {
    per_query.push_back(scores_per_query(side, side, 0));
    EXPECT_LE(per_query.back(), 7 * side + 2 * 256);
  }
  EXPECT_LT(per_query[2], 2.2 * per_query[1]);  // ~ 7·side keys a query: linear in the side only
}

// Once a grid row is longer than a query tile, the work per query stops
// growing: the K runs of a tile's windows meet a bounded number of key tiles
// whatever the row length. 16 × 512 and 16 × 1024 grids: the same scores per
// query within 10% (about 1690 here). neighborhood_attention's default tiles
// have 128 rows; the engine's 256-row tiles for long sequences would be flat
// too but compute about twice the scores (3346 and 3354 here).
TEST(NeighborhoodStats, WorkPerQueryIsFlatOnceRowsOutgrowTheTile) {
  const double a = scores_per_query(16, 512, 0), b = scores_per_query(16, 1024, 0);
  EXPECT_LT(b, 1.1 * a);
  EXPECT_LE(b, 8 * 2 * 256);  // at most 8 grid rows × 2 key tiles of 256 per query tile
  EXPECT_LT(a, 0.6 * scores_per_query(16, 512, 256));  // the default is not the 256-row tiles
}

// ------------------------------------------------------------------ errors --

TEST(NeighborhoodErrors, ThrowBeforeWriting) {
  const Problem p = make(1, 1, 1, 20, 20, 8, 8);
  const Inputs<float> in(p, 1);
  Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
  for (auto& x : out.buf) x = 42.f;
  auto expect = [&](const attn::Neighborhood& nb, const std::string& what) {
    for (int path = 0; path < 2; ++path) {
      try {
        if (path == 0)
          attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, nb);
        else
          attn::neighborhood_attention(in.q.view, in.k.view, in.v.view, out.view, nb);
        FAIL() << "no error for " << what;
      } catch (const attn::Error& e) {
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      }
      for (float x : out.buf) ASSERT_EQ(x, 42.f);
    }
  };
  expect(attn::neighborhood({4, 6}, 3), "neighborhood grid has 24 tokens, but Lq = 20 and Lk = 20");
  expect(attn::neighborhood({4, 5}, 3, 2),
         "neighborhood kernel 3 x dilation 2 = 6 exceeds grid extent 0 = 4");
  expect(attn::neighborhood({4, 5}, 0), "neighborhood kernel 0 is 0, must be >= 1");
  EXPECT_THROW(attn::neighborhood({2, 2, 2, 2}, 1), attn::Error);
  EXPECT_THROW(attn::neighborhood({4, 5}, {3, 3, 3}), attn::Error);
}

}  // namespace
