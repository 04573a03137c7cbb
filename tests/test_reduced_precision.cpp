// Eigen::half and Eigen::bfloat16 storage with float accumulation, and mixed
// storage (bf16 K/V with float Q), against the fp64 reference and against the
// naive path run in the same storage type.
#include "support.hpp"
#include "type_names.hpp"

#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attn_test;

// -------------------------------------------------------------- helpers --

/// q, k, v of one problem, each in its own storage type, N(0, 1) entries.
template <class Q, class K, class V>
struct MixedInputs {
  Tensor<Q> q;
  Tensor<K> k;
  Tensor<V> v;
  MixedInputs(const Problem& p, std::uint32_t seed)
      : q(random_tensor<Q>(p.B, p.Hq, p.Lq, p.D, seed, p.layout)),
        k(random_tensor<K>(p.B, p.Hkv, p.Lk, p.D, seed + 1, p.layout)),
        v(random_tensor<V>(p.B, p.Hkv, p.Lk, p.Dv, seed + 2, p.layout)) {}
};

attn::AttentionShape shape_of(const Problem& p) {
  attn::AttentionShape s;
  s.batch = p.B;
  s.q_heads = p.Hq;
  s.kv_heads = p.Hkv;
  s.lq = p.Lq;
  s.lk = p.Lk;
  s.d = p.D;
  s.dv = p.Dv;
  return s;
}

/// What a user gets by writing attention with every materialised tensor in T:
/// S = T(scale·q·kᵀ) (dot products accumulated in float, as a GEMM would),
/// E = T(exp(S - rowmax)), P = T(E / rowsum(E)), out = T(P·V) (float sums).
template <class T, class Mask, class Mod>
Tensor<T> naive_in_storage(const MixedInputs<T, T, T>& in, const Problem& p, const Mask& mask,
                           const Mod& mod, double scale) {
  const attn::AttentionShape shape = shape_of(p);
  const Mask m = mask.bind(shape);
  const Mod md = mod.bind(shape);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Tensor<T> out(p.B, p.Hq, p.Lq, p.Dv);
  std::vector<T> s(static_cast<std::size_t>(p.Lk));
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h) {
      const index_t hk = shape.kv_head(h);
      for (index_t i = 0; i < p.Lq; ++i) {
        float mx = neg_inf;
        for (index_t j = 0; j < p.Lk; ++j) {
          float dot = 0;
          for (index_t c = 0; c < p.D; ++c)
            dot += static_cast<float>(in.q(b, h, i, c)) * static_cast<float>(in.k(b, hk, j, c));
          const float score = md(b, h, i, j, static_cast<float>(scale) * dot);
          s[static_cast<std::size_t>(j)] = static_cast<T>(m.keep(b, h, i, j) ? score : neg_inf);
          mx = std::max(mx, static_cast<float>(s[static_cast<std::size_t>(j)]));
        }
        if (mx == neg_inf) continue;  // a row that sees no key stays zero
        float sum = 0;
        for (auto& e : s) {
          e = static_cast<T>(std::exp(static_cast<float>(e) - mx));
          sum += static_cast<float>(e);
        }
        for (auto& e : s) e = static_cast<T>(static_cast<float>(e) / sum);
        for (index_t c = 0; c < p.Dv; ++c) {
          float acc = 0;
          for (index_t j = 0; j < p.Lk; ++j)
            acc += static_cast<float>(s[static_cast<std::size_t>(j)]) *
                   static_cast<float>(in.v(b, hk, j, c));
          out(b, h, i, c) = static_cast<T>(acc);
        }
      }
    }
  return out;
}

/// The fast path's result for one problem, the fp64 reference of the same
/// (already rounded) inputs, and their log-sum-exps.
template <class O>
struct Outcome {
  Tensor<O> out;
  Tensor<double> ref;
  std::vector<float> lse, lse_ref;
  double error() const { return max_abs_diff(out, ref); }
};

template <class O, class Q, class K, class V, class Mask, class Mod>
Outcome<O> run(const MixedInputs<Q, K, V>& in, const Problem& p, const Mask& mask, const Mod& mod,
               attn::AttentionOptions opt = {}) {
  Outcome<O> r;
  const Tensor<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
  r.ref = Tensor<double>(p.B, p.Hq, p.Lq, p.Dv);
  r.lse_ref.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
  r.lse.assign(r.lse_ref.size(), 0.f);
  attn::AttentionOptions ref_opt = opt;
  ref_opt.lse = attn::TensorView<float, 3>(r.lse_ref.data(), {p.B, p.Hq, p.Lq});
  attn::reference::attention(q.cview(), k.cview(), v.cview(), r.ref.view, mask, mod, ref_opt);
  r.out = Tensor<O>(p.B, p.Hq, p.Lq, p.Dv, p.layout);
  opt.lse = attn::TensorView<float, 3>(r.lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.cview(), in.k.cview(), in.v.cview(), r.out.view, mask, mod, opt);
  return r;
}

/// Machine epsilon 2^(1 - digits) of a storage type. (Eigen 3.4.0's
static_assert(std::numeric_limits<Eigen::half>::digits == 11, "half has an 11-bit significand");
static_assert(std::numeric_limits<Eigen::bfloat16>::digits == 8,
              "bfloat16 has an 8-bit significand");

/// Allowed error of an output stored in O after float (or double) accumulation:
/// one rounding of the output to O (half an ulp, |err| <= eps_O/2 · |out|, taken
/// twice for margin) plus the accumulation error of support.hpp's tolerance.
template <class O, class Acc>
double storage_tolerance(const Problem& p, double max_ref, double vmax) {
  return eps<O>() * std::max(max_ref, 1.0) + tolerance<Acc>(p.D, p.Lk, vmax);
}

template <class O>
void expect_lse_close(const Outcome<O>& r, double tol) {
  for (std::size_t i = 0; i < r.lse.size(); ++i) {
    if (std::isinf(r.lse_ref[i])) {
      ASSERT_EQ(r.lse[i], r.lse_ref[i]) << "lse row " << i;
    } else {
      ASSERT_NEAR(r.lse[i], r.lse_ref[i], tol * (1.0 + std::abs(r.lse_ref[i]))) << "lse row " << i;
    }
  }
}

/// Same-storage run of T: the error against fp64 is within the storage
/// tolerance and at most twice the naive same-storage error (plus the float
/// accumulation tolerance as a floor).
template <class T, class Mask = attn::NoMask, class Mod = attn::NoScoreMod>
void expect_storage_accuracy(const Problem& p, const Mask& mask = {}, const Mod& mod = {},
                             attn::AttentionOptions opt = {}, std::uint32_t seed = 3) {
  SCOPED_TRACE(p.str());
  const MixedInputs<T, T, T> in(p, seed);
  const Outcome<T> r = run<T>(in, p, mask, mod, opt);
  const double vmax = max_abs(in.v), max_ref = max_abs(r.ref);
  const double fast = r.error();
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.D)));
  const double naive = max_abs_diff(naive_in_storage(in, p, mask, mod, scale), r.ref);
  const double floor = tolerance<float>(p.D, p.Lk, vmax);
  EXPECT_LE(fast, (storage_tolerance<T, float>(p, max_ref, vmax)));
  EXPECT_LE(fast, 2.0 * naive + floor) << "naive same-storage error " << naive;
  expect_lse_close(r, tolerance<float>(p.D, p.Lk, vmax));
}

// ------------------------------------------------- half and bfloat16 alone --

template <class T>
class ReducedPrecision : public ::testing::Test {};
using HalfTypes = ::testing::Types<Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(ReducedPrecision, HalfTypes, StorageTypeNames);

TYPED_TEST(ReducedPrecision, DenseLengthsAroundTheTiles) {
  for (const auto& [lq, lk] :
       {std::pair<index_t, index_t>{1, 1}, {5, 300}, {127, 255}, {129, 257}, {200, 140}})
    expect_storage_accuracy<TypeParam>(make(1, 2, 2, lq, lk, 64, 64));
}

TYPED_TEST(ReducedPrecision, OddHeadDimsAndDvDiffersFromD) {
  expect_storage_accuracy<TypeParam>(make(2, 2, 1, 70, 90, 59, 80));
  expect_storage_accuracy<TypeParam>(make(1, 3, 3, 33, 65, 111, 16));
  expect_storage_accuracy<TypeParam>(make(1, 1, 1, 40, 50, 128, 128));
}

TYPED_TEST(ReducedPrecision, GroupedHeadsInTheSequenceMajorLayoutWithSmallTiles) {
  attn::AttentionOptions opt;
  opt.block_q = 17;
  opt.block_k = 40;
  expect_storage_accuracy<TypeParam>(make(2, 4, 2, 45, 150, 32, 32, Layout::bshd), attn::no_mask(),
                                     attn::no_score_mod(), opt);
}

TYPED_TEST(ReducedPrecision, MasksAndScoreModifiers) {
  const Problem p = make(2, 4, 2, 100, 180, 32, 32);
  expect_storage_accuracy<TypeParam>(p, attn::causal());
  expect_storage_accuracy<TypeParam>(p, attn::causal_top_left() & attn::key_padding({150, 37}));
  expect_storage_accuracy<TypeParam>(
      p, attn::causal(), attn::compose(attn::alibi(attn::alibi_slopes(4)), attn::softcap(5.0)));
}

// Large scores (|score| up to ~30): the exponent trick keeps the fast path
// within the derived tolerance while the naive path rounds big scores in T.
TYPED_TEST(ReducedPrecision, LargeScores) {
  attn::AttentionOptions opt;
  opt.scale = 1.0;
  expect_storage_accuracy<TypeParam>(make(1, 2, 2, 64, 200, 48, 48), attn::no_mask(),
                                     attn::no_score_mod(), opt);
}

// The public dense entry accepts reduced storage directly and equals
// masked_attention(no_mask) bit for bit.
TYPED_TEST(ReducedPrecision, DenseEntryEqualsMaskedEntry) {
  const Problem p = make(1, 2, 1, 50, 70, 24, 24);
  const MixedInputs<TypeParam, TypeParam, TypeParam> in(p, 9);
  Tensor<TypeParam> a(p.B, p.Hq, p.Lq, p.Dv), b(p.B, p.Hq, p.Lq, p.Dv);
  attn::scaled_dot_product_attention(in.q.view, in.k.view, in.v.view, a.view);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, b.view, attn::no_mask());
  EXPECT_EQ(0, std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(TypeParam)));
}

// ------------------------------------------------------------ mixed storage --

// bf16 K/V with float Q and a float output: accumulation is float, so the
// error is float-sized (the rounding of K/V to bf16 is in the inputs the
// reference sees too).
TEST(MixedStorage, Bfloat16KeysValuesWithFloatQueries) {
  for (Layout layout : {Layout::bhsd, Layout::bshd}) {
    const Problem p = make(2, 4, 2, 130, 260, 64, 64, layout);
    SCOPED_TRACE(p.str());
    const MixedInputs<float, Eigen::bfloat16, Eigen::bfloat16> in(p, 21);
    const auto r = run<float>(in, p, attn::causal(), attn::no_score_mod());
    const double tol = tolerance<float>(p.D, p.Lk, max_abs(in.v));
    EXPECT_LE(r.error(), tol);
    expect_lse_close(r, tol);
  }
}

// bf16 K/V, float Q, bf16 output: one rounding of the output on top.
TEST(MixedStorage, Bfloat16KeysValuesAndOutputWithFloatQueries) {
  const Problem p = make(1, 2, 1, 77, 190, 40, 56);
  const MixedInputs<float, Eigen::bfloat16, Eigen::bfloat16> in(p, 23);
  const auto r = run<Eigen::bfloat16>(in, p, attn::no_mask(), attn::no_score_mod());
  EXPECT_LE(r.error(),
            (storage_tolerance<Eigen::bfloat16, float>(p, max_abs(r.ref), max_abs(in.v))));
}

// half inputs into a float output, and into a double output (double
// accumulation: the error is double-sized).
TEST(MixedStorage, HalfInputsIntoWiderOutputs) {
  const Problem p = make(1, 2, 2, 90, 120, 32, 32);
  const MixedInputs<Eigen::half, Eigen::half, Eigen::half> in(p, 25);
  const auto f = run<float>(in, p, attn::causal(), attn::no_score_mod());
  EXPECT_LE(f.error(), tolerance<float>(p.D, p.Lk, max_abs(in.v)));
  const auto d = run<double>(in, p, attn::causal(), attn::no_score_mod());
  EXPECT_LE(d.error(), tolerance<double>(p.D, p.Lk, max_abs(in.v)));
}

// half K/V with bf16 Q: any pairing of the two 16-bit types works.
TEST(MixedStorage, HalfKeysValuesWithBfloat16Queries) {
  const Problem p = make(1, 2, 1, 60, 80, 16, 24);
  const MixedInputs<Eigen::bfloat16, Eigen::half, Eigen::half> in(p, 27);
  const auto r = run<Eigen::half>(in, p, attn::key_padding({51}), attn::no_score_mod());
  EXPECT_LE(r.error(), (storage_tolerance<Eigen::half, float>(p, max_abs(r.ref), max_abs(in.v))));
}

}  // namespace
