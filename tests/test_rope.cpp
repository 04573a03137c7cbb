// Rotary position embedding: the formula, both pairings, offsets, partial
// rotary dims, strided views, its invariants, and its argument checks.
#include "layer_reference.hpp"

#include <attn/rope.hpp>

namespace {

using namespace attn_test;

template <class T>
class Rope : public ::testing::Test {};
TYPED_TEST_SUITE(Rope, FloatTypes, );

/// The [L, D] matrix of (b, h) of a tensor, in fp64.
template <class T>
MatD slice(const Tensor<T>& t, index_t b, index_t h) {
  MatD m(t.extent(2), t.extent(3));
  for (index_t l = 0; l < t.extent(2); ++l)
    for (index_t d = 0; d < t.extent(3); ++d) m(l, d) = static_cast<double>(t(b, h, l, d));
  return m;
}

// Both pairings, offsets, partial rotary dims, on bhsd and bshd (strided) views.
TYPED_TEST(Rope, MatchesFormula) {
  using T = TypeParam;
  for (auto pairing : {attn::RopePairing::half_split, attn::RopePairing::interleaved})
    for (index_t rd : {0, 8})
      for (Layout layout : {Layout::bhsd, Layout::bshd}) {
        attn::Rope r;
        r.pairing = pairing;
        r.rotary_dim = rd;
        r.offset = 1000;
        r.theta = 10000.0;
        const Tensor<T> x0 = random_tensor<T>(2, 3, 40, 24, 5, layout);
        Tensor<T> x = x0;
        attn::apply_rope(x.view, r);
        for (index_t b = 0; b < 2; ++b)
          for (index_t h = 0; h < 3; ++h) {
            MatD ref = slice(x0, b, h);
            rope_reference(ref, r);
            // |x| <= ~4 and angles up to ~1000 rad: cos/sin are rounded to T once.
            EXPECT_LE((slice(x, b, h) - ref).cwiseAbs().maxCoeff(), 16 * eps<T>() * 4)
                << "pairing=" << int(pairing) << " rd=" << rd << " " << layout_name(layout);
          }
      }
}

// Rotations preserve each pair's norm, hence each row's norm.
TYPED_TEST(Rope, PreservesNorms) {
  using T = TypeParam;
  for (auto pairing : {attn::RopePairing::half_split, attn::RopePairing::interleaved}) {
    attn::Rope r;
    r.pairing = pairing;
    const Tensor<T> x0 = random_tensor<T>(1, 2, 64, 32, 9);
    Tensor<T> x = x0;
    attn::apply_rope(x.view, r);
    for (index_t h = 0; h < 2; ++h) {
      const MatD a = slice(x0, 0, h), b = slice(x, 0, h);
      for (index_t l = 0; l < 64; ++l)
        EXPECT_NEAR(a.row(l).norm(), b.row(l).norm(), 16 * eps<T>() * a.row(l).norm()) << l;
    }
  }
}

// q·k after rotating q to position m and k to position n depends on m - n
// only: shifting both positions by s leaves it unchanged, while shifting one
// of them changes it.
TYPED_TEST(Rope, DotProductDependsOnlyOnPositionDifference) {
  using T = TypeParam;
  for (auto pairing : {attn::RopePairing::half_split, attn::RopePairing::interleaved}) {
    attn::Rope r;
    r.pairing = pairing;
    const index_t L = 50, D = 16;
    const Tensor<T> base = random_tensor<T>(1, 2, 1, D, 3);
    // Row l holds the same q (head 0) or k (head 1); rotation puts it at position l.
    Tensor<T> x(1, 2, L, D);
    for (index_t h = 0; h < 2; ++h)
      for (index_t l = 0; l < L; ++l)
        for (index_t d = 0; d < D; ++d) x(0, h, l, d) = base(0, h, 0, d);
    attn::apply_rope(x.view, r);
    const MatD q = slice(x, 0, 0), k = slice(x, 0, 1);
    const double qk_norm = slice(base, 0, 0).norm() * slice(base, 0, 1).norm();
    for (index_t m : {3, 17, 20})
      for (index_t n : {0, 9, 20})
        for (index_t s : {1, 12, 29}) {
          EXPECT_NEAR(q.row(m).dot(k.row(n)), q.row(m + s).dot(k.row(n + s)),
                      32 * eps<T>() * qk_norm)
              << "m=" << m << " n=" << n << " s=" << s;
        }
    EXPECT_GT(std::abs(q.row(3).dot(k.row(0)) - q.row(3).dot(k.row(1))), 1e-3);
  }
}

// Interleaved pairing is half-split pairing after the permutation that moves
// dims (2i, 2i+1) to (i, i + D/2).
TYPED_TEST(Rope, InterleavedIsPermutedHalfSplit) {
  using T = TypeParam;
  const index_t L = 30, D = 12;
  const Tensor<T> x0 = random_tensor<T>(1, 1, L, D, 4);
  Tensor<T> a = x0, b(1, 1, L, D);
  for (index_t l = 0; l < L; ++l)
    for (index_t i = 0; i < D / 2; ++i) {
      b(0, 0, l, i) = x0(0, 0, l, 2 * i);
      b(0, 0, l, i + D / 2) = x0(0, 0, l, 2 * i + 1);
    }
  attn::Rope r;
  r.pairing = attn::RopePairing::interleaved;
  attn::apply_rope(a.view, r);
  r.pairing = attn::RopePairing::half_split;
  attn::apply_rope(b.view, r);
  for (index_t l = 0; l < L; ++l)
    for (index_t i = 0; i < D / 2; ++i) {
      // Same arithmetic on the same numbers; only FMA contraction may differ.
      EXPECT_NEAR(a(0, 0, l, 2 * i), b(0, 0, l, i), 4 * eps<T>() * 4);
      EXPECT_NEAR(a(0, 0, l, 2 * i + 1), b(0, 0, l, i + D / 2), 4 * eps<T>() * 4);
    }
}

// Continuing a sequence: rows rotated with offset o equal rows o.. of the
// whole sequence rotated from position 0.
TYPED_TEST(Rope, OffsetContinuesTheSequence) {
  using T = TypeParam;
  const index_t L = 40, o = 25, D = 8;
  const Tensor<T> whole0 = random_tensor<T>(1, 1, L, D, 8);
  Tensor<T> whole = whole0, tail(1, 1, L - o, D);
  for (index_t l = o; l < L; ++l)
    for (index_t d = 0; d < D; ++d) tail(0, 0, l - o, d) = whole0(0, 0, l, d);
  attn::Rope r;
  attn::apply_rope(whole.view, r);
  r.offset = o;
  attn::apply_rope(tail.view, r);
  for (index_t l = o; l < L; ++l)
    for (index_t d = 0; d < D; ++d) EXPECT_EQ(whole(0, 0, l, d), tail(0, 0, l - o, d));
}

TEST(RopeErrors, BadSettingsThrowAndLeaveInputUnchanged) {
  Tensor<float> x = random_tensor<float>(1, 1, 4, 6, 1);
  const std::vector<float> before = x.buf;
  attn::Rope r;
  r.theta = 0;
  EXPECT_TRUE(
      throws_with([&] { attn::apply_rope(x.view, r); }, "rope theta is 0, must be finite and > 0"));
  r = attn::Rope{};
  r.offset = -3;
  EXPECT_TRUE(throws_with([&] { attn::apply_rope(x.view, r); }, "rope offset is -3"));
  r = attn::Rope{};
  r.rotary_dim = 8;
  EXPECT_TRUE(throws_with([&] { attn::apply_rope(x.view, r); },
                          "rope rotary_dim is 8, must be in [0, head dim 6]"));
  r.rotary_dim = 3;
  EXPECT_TRUE(throws_with([&] { attn::apply_rope(x.view, r); }, "rotary dim is 3 (odd)"));
  Tensor<float> odd(1, 1, 4, 5);
  EXPECT_TRUE(throws_with([&] { attn::apply_rope(odd.view, attn::Rope{}); },
                          "rotary dim is 5 (odd); head dim is 5"));
  EXPECT_EQ(x.buf, before);
}

}  // namespace
