// Global positions and merging by log-sum-exp: attention computed in pieces
// (key slices merged by attn::merge_partials, query slices at their global
// positions) equals the one-shot fp64 reference under every position-aware
// mask and modifier.
#include "support.hpp"

#include <limits>

namespace {

using namespace attn_test;

/// Rows [start, start + len) of dimension 2 of a view.
template <class T>
attn::Tensor4<T> rows_of(const attn::Tensor4<T>& t, index_t start, index_t len) {
  return attn::Tensor4<T>(t.data() + start * t.stride(2),
                          {t.extent(0), t.extent(1), len, t.extent(3)}, t.strides());
}

std::vector<float> lse_buffer(const Problem& p) {
  return std::vector<float>(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
}

attn::TensorView<float, 3> lse_view(std::vector<float>& l, const Problem& p) {
  return attn::TensorView<float, 3>(l.data(), {p.B, p.Hq, p.Lq});
}

/// Attention over the keys split at `cuts`, one call per slice with its global
/// key positions, merged into the first; checked against the fp64 reference.
template <class T, class Mask, class Mod>
void expect_key_slices_merge(const Problem& p, std::vector<index_t> cuts, const Mask& mask,
                             const Mod& mod) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, 11);
  std::vector<float> lse_ref;
  const Tensor<double> ref = reference_output(in, p, mask, mod, {}, &lse_ref);

  cuts.insert(cuts.begin(), 0);
  cuts.push_back(p.Lk);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout), piece(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  std::vector<float> lse = lse_buffer(p), lse_piece = lse_buffer(p);
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    const index_t k0 = cuts[i], len = cuts[i + 1] - cuts[i];
    attn::AttentionOptions opt;
    opt.positions.k_offset = k0;
    opt.positions.k_length = p.Lk;
    opt.lse = lse_view(i == 0 ? lse : lse_piece, p);
    attn::masked_attention(in.q.view, rows_of(in.k.view, k0, len), rows_of(in.v.view, k0, len),
                           i == 0 ? out.view : piece.view, mask, mod, opt);
    if (i > 0)
      attn::merge_partials(out.view, lse_view(lse, p), piece.view,
                           attn::TensorView<const float, 3>(lse_view(lse_piece, p)));
  }
  // Each merge adds a few roundings of out on top of one call's error, and the
  // lse it weighs by is stored in float: an absolute error eps_f·|lse| in each
  // exponent becomes a relative error of the weights, of out and of lse.
  double lmax = 0;
  for (float l : lse_ref)
    if (std::isfinite(l)) lmax = std::max(lmax, static_cast<double>(std::abs(l)));
  const double tol = 2.0 * tolerance<T>(p.D, p.Lk, max_abs(in.v)) +
                     8.0 * eps<float>() * (1.0 + lmax) * std::max(max_abs(in.v), 1.0);
  expect_close(out, ref, lse, lse_ref, tol);
}

/// Attention of the query rows split at `cuts`, each call at its global query
/// positions over all keys; checked against the fp64 reference.
template <class T, class Mask, class Mod>
void expect_query_slices(const Problem& p, std::vector<index_t> cuts, const Mask& mask,
                         const Mod& mod) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, 13);
  std::vector<float> lse_ref;
  const Tensor<double> ref = reference_output(in, p, mask, mod, {}, &lse_ref);
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(p.Lq);
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  std::vector<float> lse = lse_buffer(p);
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    const index_t q0 = cuts[i], len = cuts[i + 1] - cuts[i];
    attn::AttentionOptions opt;
    opt.positions.q_offset = q0;
    opt.positions.q_length = p.Lq;
    opt.lse = attn::TensorView<float, 3>(lse.data() + q0, {p.B, p.Hq, len}, {p.Hq * p.Lq, p.Lq, 1});
    attn::masked_attention(rows_of(in.q.view, q0, len), in.k.view, in.v.view,
                           rows_of(out.view, q0, len), mask, mod, opt);
  }
  expect_close(out, ref, lse, lse_ref, tolerance<T>(p.D, p.Lk, max_abs(in.v)));
}

template <class T>
class Pieces : public ::testing::Test {};
TYPED_TEST_SUITE(Pieces, FloatTypes);

TYPED_TEST(Pieces, KeySlicesMergeToTheWhole) {
  using T = TypeParam;
  for (Layout layout : {Layout::bhsd, Layout::bshd}) {
    const Problem p = make(2, 4, 2, 37, 53, 16, 12, layout);
    const std::vector<index_t> cuts = {17, 30};
    expect_key_slices_merge<T>(p, cuts, attn::no_mask(), attn::no_score_mod());
    expect_key_slices_merge<T>(p, cuts, attn::causal(), attn::no_score_mod());
    expect_key_slices_merge<T>(p, cuts, attn::causal_top_left(), attn::no_score_mod());
    expect_key_slices_merge<T>(p, cuts, attn::window(6, 2), attn::no_score_mod());
    expect_key_slices_merge<T>(p, cuts, attn::key_padding({40, 9}), attn::no_score_mod());
    expect_key_slices_merge<T>(p, cuts, attn::causal(), attn::alibi(attn::alibi_slopes(4)));
    expect_key_slices_merge<T>(p, cuts, attn::no_mask(), attn::softcap(3.0));
  }
}

TYPED_TEST(Pieces, KeySlicesOfOneKeyAndOfWholeTiles) {
  using T = TypeParam;
  const Problem p = make(1, 2, 1, 20, 300, 8, 8);
  expect_key_slices_merge<T>(p, {1, 256, 299}, attn::causal(), attn::no_score_mod());
  expect_key_slices_merge<T>(p, {128}, attn::window(100, 0), attn::no_score_mod());
}

TYPED_TEST(Pieces, QuerySlicesAtTheirPositions) {
  using T = TypeParam;
  for (Layout layout : {Layout::bhsd, Layout::bshd}) {
    const Problem p = make(2, 4, 1, 45, 60, 16, 8, layout);
    const std::vector<index_t> cuts = {1, 20, 44};
    expect_query_slices<T>(p, cuts, attn::causal(), attn::no_score_mod());
    expect_query_slices<T>(p, cuts, attn::causal_top_left(), attn::no_score_mod());
    expect_query_slices<T>(p, cuts, attn::window(3, 3), attn::alibi(attn::alibi_slopes(4)));
    expect_query_slices<T>(p, cuts, attn::key_padding({7, 60}), attn::no_score_mod());
  }
}

TEST(Merge, SideThatSawNoKeyLeavesTheOtherExactly) {
  const index_t B = 1, H = 1, L = 3, D = 4;
  std::vector<float> a = {1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0};
  std::vector<float> b = {9, 9, 9, 9, 5, 6, 7, 8, 0, 0, 0, 0};
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> la = {0.5f, -inf, -inf}, lb = {-inf, 1.25f, -inf};
  attn::merge_partials(
      attn::bhsd(a.data(), B, H, L, D), attn::TensorView<float, 3>(la.data(), {B, H, L}),
      attn::bhsd(b.data(), B, H, L, D), attn::TensorView<const float, 3>(lb.data(), {B, H, L}));
  const std::vector<float> want = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0};
  EXPECT_EQ(a, want);
  EXPECT_EQ(la[0], 0.5f);
  EXPECT_EQ(la[1], 1.25f);
  EXPECT_EQ(la[2], -inf);
}

TEST(Merge, EqualWeightsAverageAndAddLog2) {
  std::vector<float> a = {1, 3}, b = {3, 5}, la = {2.f}, lb = {2.f};
  attn::merge_partials(
      attn::bhsd(a.data(), 1, 1, 1, 2), attn::TensorView<float, 3>(la.data(), {1, 1, 1}),
      attn::bhsd(b.data(), 1, 1, 1, 2), attn::TensorView<const float, 3>(lb.data(), {1, 1, 1}));
  EXPECT_NEAR(a[0], 2.f, 4 * eps<float>());
  EXPECT_NEAR(a[1], 4.f, 8 * eps<float>());
  EXPECT_NEAR(la[0], 2.f + std::log(2.f), 4 * eps<float>());
}

TEST(Merge, NaNPropagates) {
  std::vector<float> a = {1, 3}, b = {3, 5}, la = {2.f}, lb = {std::nanf("")};
  attn::merge_partials(
      attn::bhsd(a.data(), 1, 1, 1, 2), attn::TensorView<float, 3>(la.data(), {1, 1, 1}),
      attn::bhsd(b.data(), 1, 1, 1, 2), attn::TensorView<const float, 3>(lb.data(), {1, 1, 1}));
  EXPECT_TRUE(std::isnan(la[0]));
  EXPECT_TRUE(std::isnan(a[0]));
}

TEST(Merge, RefusesMismatchedShapesAndOverlap) {
  std::vector<float> a(8, 1.f), b(8, 2.f), la(2, 0.f), lb(2, 0.f);
  const auto A = attn::bhsd(a.data(), 1, 1, 2, 4);
  const attn::TensorView<float, 3> LA(la.data(), {1, 1, 2});
  const attn::TensorView<const float, 3> LB(lb.data(), {1, 1, 2});
  const std::vector<float> a0 = a, la0 = la;
  try {
    attn::merge_partials(A, LA, attn::bhsd(b.data(), 1, 1, 2, 3), LB);
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_STREQ(e.what(), "attn: out_b has shape [1, 1, 2, 3], but out has shape [1, 1, 2, 4]");
  }
  try {
    attn::merge_partials(A, LA, attn::bhsd(a.data() + 4, 1, 1, 1, 4),
                         attn::TensorView<const float, 3>(lb.data(), {1, 1, 1}));
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("out_b has shape [1, 1, 1, 4]"), std::string::npos);
  }
  try {
    attn::merge_partials(A, LA, A, LB);
    FAIL() << "no error";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("out overlaps out_b"), std::string::npos) << e.what();
  }
  EXPECT_EQ(a, a0);
  EXPECT_EQ(la, la0);
}

TEST(Positions, RefusedWhenTheCallDoesNotFit) {
  const Problem p = make(1, 1, 1, 4, 6, 8, 8);
  const Inputs<float> in(p, 3);
  Tensor<float> out(1, 1, 4, 8);
  const std::vector<float> before = out.buf;
  auto expect_error = [&](attn::Positions pos, const std::string& msg) {
    attn::AttentionOptions opt;
    opt.positions = pos;
    try {
      attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), opt);
      FAIL() << "no error for " << msg;
    } catch (const attn::Error& e) {
      EXPECT_EQ(std::string(e.what()), msg);
    }
    EXPECT_EQ(out.buf, before);
  };
  expect_error({-1, 0, 0, 0}, "attn: positions.q_offset is -1, must be >= 0");
  expect_error({0, -2, 0, 0}, "attn: positions.k_offset is -2, must be >= 0");
  expect_error({2, 0, 5, 0},
               "attn: positions: queries [2, q_offset + Lq = 2 + 4) do not fit q_length 5");
  expect_error({0, 1, 0, 6},
               "attn: positions: keys [1, k_offset + Lk = 1 + 6) do not fit k_length 6");
  expect_error({0, 0, -3, 0}, "attn: positions.q_length is -3, must be >= 0 (0 = q_offset + Lq)");
  expect_error({std::numeric_limits<index_t>::max() - 1, 0, 0, 0},
               "attn: positions.q_offset 9223372036854775806 + Lq 4 overflows");
}

}  // namespace
