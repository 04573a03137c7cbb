// Numerical edge cases: huge scores, scaled inputs, NaN/Inf locality, rows
// that see no key, all-equal scores. Every dtype where the case applies.
#include "support.hpp"
#include "type_names.hpp"

#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

namespace {

using namespace attn_test;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// Largest |scale · q·k| over the problem.
template <class T>
double max_score(const Inputs<T>& in, const Problem& p, double scale) {
  double m = 0;
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h)
      for (index_t i = 0; i < p.Lq; ++i)
        for (index_t j = 0; j < p.Lk; ++j) {
          double dot = 0;
          for (index_t c = 0; c < p.D; ++c)
            dot += static_cast<double>(in.q(b, h, i, c)) *
                   static_cast<double>(in.k(b, h / (p.Hq / p.Hkv), j, c));
          m = std::max(m, std::abs(scale * dot));
        }
  return m;
}

/// Output and lse of masked_attention in T.
template <class T>
struct Result {
  Tensor<T> out;
  std::vector<float> lse;
};

template <class T, class Mask = attn::NoMask, class Mod = attn::NoScoreMod>
Result<T> fast(const Inputs<T>& in, const Problem& p, const Mask& mask = {}, const Mod& mod = {},
               attn::AttentionOptions opt = {}) {
  Result<T> r;
  r.out = Tensor<T>(p.B, p.Hq, p.Lq, p.Dv);
  r.lse.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), 0.f);
  opt.lse = attn::TensorView<float, 3>(r.lse.data(), {p.B, p.Hq, p.Lq});
  attn::masked_attention(in.q.view, in.k.view, in.v.view, r.out.view, mask, mod, opt);
  return r;
}

bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float f) { return std::isfinite(f); });
}
template <class T>
bool all_finite(const Tensor<T>& t) {
  return std::all_of(t.buf.begin(), t.buf.end(),
                     [](const T& x) { return std::isfinite(static_cast<double>(x)); });
}

template <class T>
class Numerics : public ::testing::Test {};
TYPED_TEST_SUITE(Numerics, FloatTypes, StorageTypeNames);

template <class T>
class EveryStorage : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(EveryStorage, StorageTypes, StorageTypeNames);

// ------------------------------------------------------------ huge scores --

// A scale that makes the largest |score| 1e4: exp never overflows (every
// exponent is score - rowmax <= 0) and the result matches fp64 within the
// derived tolerance with smax = 1e4.
TYPED_TEST(Numerics, ScoresUpToTenThousand) {
  using T = TypeParam;
  const Problem p = make(1, 2, 2, 150, 300, 32, 32);
  const Inputs<T> in(p, 41);
  attn::AttentionOptions opt;
  const double smax = 1e4;
  opt.scale = smax / max_score(in, p, 1.0);
  std::vector<float> lse_ref;
  const Tensor<double> ref =
      reference_output(in, p, attn::causal(), attn::no_score_mod(), opt, &lse_ref);
  const Result<T> r = fast(in, p, attn::causal(), attn::no_score_mod(), opt);
  ASSERT_TRUE(all_finite(r.out));
  ASSERT_TRUE(all_finite(r.lse));
  const double tol = tolerance<T>(p.D, p.Lk, max_abs(in.v), smax);
  EXPECT_LE(max_abs_diff(r.out, ref), tol);
  for (std::size_t i = 0; i < r.lse.size(); ++i)
    ASSERT_NEAR(r.lse[i], lse_ref[i], tolerance<T>(p.D, p.Lk) * (1.0 + std::abs(lse_ref[i])));
}

// Same in half and bfloat16 storage (float accumulation): nothing overflows
// although 1e4 is far outside what the scores could be stored in.
TEST(NumericsReduced, ScoresUpToTenThousandInHalfAndBfloat16) {
  const Problem p = make(1, 2, 1, 70, 130, 16, 16);
  auto check = [&](auto tag) {
    using T = decltype(tag);
    const Inputs<T> in(p, 43);
    attn::AttentionOptions opt;
    opt.scale = 1e4 / max_score(in, p, 1.0);
    const Tensor<double> ref = reference_output(in, p, attn::no_mask(), attn::no_score_mod(), opt);
    const Result<T> r = fast(in, p, attn::no_mask(), attn::no_score_mod(), opt);
    ASSERT_TRUE(all_finite(r.out));
    ASSERT_TRUE(all_finite(r.lse));
    EXPECT_LE(max_abs_diff(r.out, ref),
              eps<T>() * max_abs(ref) + tolerance<float>(p.D, p.Lk, max_abs(in.v), 1e4));
  };
  check(Eigen::half());
  check(Eigen::bfloat16());
}

// q, k and v scaled by 1e3 with the scale divided by 1e6: the same
// probabilities as the unscaled problem, outputs 1e3 times larger, and the
// relative error of the unscaled problem.
TYPED_TEST(Numerics, InputsScaledByAThousand) {
  using T = TypeParam;
  const Problem p = make(2, 2, 1, 90, 200, 48, 40);
  const Inputs<T> in(p, 45, 1e3);  // q, k ~ N(0, 1e6)
  Inputs<T> scaled = in;
  for (auto& x : scaled.v.buf) x = static_cast<T>(static_cast<double>(x) * 1e3);
  attn::AttentionOptions opt;
  opt.scale = 1e-6 / std::sqrt(static_cast<double>(p.D));
  const Tensor<double> ref = reference_output(scaled, p, attn::causal(), attn::no_score_mod(), opt);
  const Result<T> r = fast(scaled, p, attn::causal(), attn::no_score_mod(), opt);
  ASSERT_TRUE(all_finite(r.out));
  EXPECT_LE(max_abs_diff(r.out, ref), tolerance<T>(p.D, p.Lk, max_abs(scaled.v)));
}

// q and k scaled by 1e3 at the default scale: scores near 1e6, each softmax
// row is all but one-hot. Outputs stay finite, each is a convex combination
// of the value rows (inside their per-column range), and lse is within the
// relative tolerance of the fp64 one.
TYPED_TEST(Numerics, InputsScaledByAThousandAtTheDefaultScale) {
  using T = TypeParam;
  const Problem p = make(1, 2, 2, 64, 160, 32, 32);
  const Inputs<T> in(p, 47, 1e3);
  std::vector<float> lse_ref;
  const Tensor<double> ref =
      reference_output(in, p, attn::no_mask(), attn::no_score_mod(), {}, &lse_ref);
  const Result<T> r = fast(in, p);
  ASSERT_TRUE(all_finite(r.out));
  ASSERT_TRUE(all_finite(r.lse));
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t c = 0; c < p.Dv; ++c) {
      double lo = kInf, hi = -kInf;
      for (index_t j = 0; j < p.Lk; ++j) {
        lo = std::min(lo, static_cast<double>(in.v(0, h, j, c)));
        hi = std::max(hi, static_cast<double>(in.v(0, h, j, c)));
      }
      const double slack = tolerance<T>(p.D, p.Lk, max_abs(in.v));
      for (index_t i = 0; i < p.Lq; ++i) {
        ASSERT_GE(static_cast<double>(r.out(0, h, i, c)), lo - slack);
        ASSERT_LE(static_cast<double>(r.out(0, h, i, c)), hi + slack);
      }
    }
  for (std::size_t i = 0; i < r.lse.size(); ++i)
    ASSERT_NEAR(r.lse[i], lse_ref[i], tolerance<float>(p.D, p.Lk) * (1.0 + std::abs(lse_ref[i])));
  // And the derived bound with smax = the largest score holds (loose here:
  // the score rounding error eps·smax is the problem's own sensitivity).
  EXPECT_LE(max_abs_diff(r.out, ref),
            tolerance<T>(p.D, p.Lk, max_abs(in.v), max_score(in, p, 1.0 / std::sqrt(32.0))));
}

// ------------------------------------------------------ NaN and Inf locality --

/// How an output element relates to a poisoned input.
enum class Dep { none, nan, unspecified };
using Affected = std::function<Dep(index_t, index_t, index_t, index_t)>;

/// Runs the clean and the poisoned problem: elements marked Dep::none are
/// bitwise equal to the clean run, Dep::nan elements are NaN.
template <class T, class Mask>
void expect_local(const Inputs<T>& clean, const Inputs<T>& poisoned, const Problem& p,
                  const Mask& mask, const Affected& affected, attn::AttentionOptions opt = {}) {
  const Result<T> a = fast(clean, p, mask, attn::no_score_mod(), opt);
  const Result<T> r = fast(poisoned, p, mask, attn::no_score_mod(), opt);
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h)
      for (index_t i = 0; i < p.Lq; ++i)
        for (index_t c = 0; c < p.Dv; ++c) {
          const Dep dep = affected(b, h, i, c);
          const T y = a.out(b, h, i, c), z = r.out(b, h, i, c);
          if (dep == Dep::nan) {
            ASSERT_TRUE(std::isnan(static_cast<double>(z)))
                << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
          } else if (dep == Dep::none) {
            ASSERT_EQ(0, std::memcmp(&y, &z, sizeof(T)))
                << "b=" << b << " h=" << h << " i=" << i << " c=" << c << " "
                << static_cast<double>(z);
          }
        }
}

Dep nan_if(bool hit) { return hit ? Dep::nan : Dep::none; }

// A NaN (or Inf) in one query row poisons exactly that output row; its lse
// is NaN too, in the fast path and in the reference.
TYPED_TEST(Numerics, NaNInOneQueryRowStaysInThatRow) {
  using T = TypeParam;
  const Problem p = make(2, 4, 2, 150, 280, 16, 16);
  const Inputs<T> clean(p, 51);
  Inputs<T> bad = clean;
  const auto row = [](index_t b, index_t h, index_t i, index_t) {
    return nan_if(b == 1 && h == 2 && i == 130);
  };
  bad.q(1, 2, 130, 5) = static_cast<T>(kNaN);
  expect_local(clean, bad, p, attn::no_mask(), row);
  const std::size_t lse_row = static_cast<std::size_t>((1 * p.Hq + 2) * p.Lq + 130);
  EXPECT_TRUE(std::isnan(fast(bad, p).lse[lse_row]));
  std::vector<float> lse_ref;
  const Tensor<double> ref =
      reference_output(bad, p, attn::no_mask(), attn::no_score_mod(), {}, &lse_ref);
  EXPECT_TRUE(std::isnan(lse_ref[lse_row]));
  EXPECT_TRUE(std::isnan(ref(1, 2, 130, 0)));
  bad.q(1, 2, 130, 5) = static_cast<T>(kInf);
  expect_local(clean, bad, p, attn::no_mask(), row);
}

// A NaN in one key row poisons the rows that see that key: every row of the
// query heads that read it (GQA) under no mask, only rows at or after it
// under a causal mask, none when key padding hides it; other batches and
// heads are untouched.
TYPED_TEST(Numerics, NaNInOneKeyRowReachesOnlyRowsThatSeeIt) {
  using T = TypeParam;
  const Problem p = make(2, 4, 2, 150, 150, 16, 16);
  const Inputs<T> clean(p, 53);
  Inputs<T> bad = clean;
  const index_t j = 70;
  bad.k(0, 1, j, 3) = static_cast<T>(kNaN);
  expect_local(clean, bad, p, attn::no_mask(),
               [](index_t b, index_t h, index_t, index_t) { return nan_if(b == 0 && h / 2 == 1); });
  expect_local(clean, bad, p, attn::causal(), [&](index_t b, index_t h, index_t i, index_t) {
    return nan_if(b == 0 && h / 2 == 1 && i >= j);
  });
  expect_local(clean, bad, p, attn::key_padding({j, p.Lk}),
               [](index_t, index_t, index_t, index_t) { return Dep::none; });
}

// A NaN in one value element poisons that column of the rows that see its
// key. Under a mask, rows that do not see the key but share a tile with it
// may get NaN as well (their zero probability times NaN in the P·V product);
// rows in tiles the mask skips are untouched.
TYPED_TEST(Numerics, NaNInOneValueReachesOnlyRowsThatSeeItsTile) {
  using T = TypeParam;
  const Problem p = make(2, 2, 1, 150, 150, 16, 24);
  const Inputs<T> clean(p, 55);
  Inputs<T> bad = clean;
  const index_t j = 70, col = 9;
  bad.v(1, 0, j, col) = static_cast<T>(kNaN);
  expect_local(clean, bad, p, attn::no_mask(),
               [&](index_t b, index_t, index_t, index_t c) { return nan_if(b == 1 && c == col); });
  attn::AttentionOptions opt;
  opt.block_q = 16;
  opt.block_k = 16;  // key 70 lies in key tile [64, 80), skipped by query tiles before row 64
  expect_local(
      clean, bad, p, attn::causal(),
      [&](index_t b, index_t, index_t i, index_t c) {
        if (b != 1 || c != col) return Dep::none;
        if (i >= j) return Dep::nan;
        return i < 64 ? Dep::none : Dep::unspecified;
      },
      opt);
}

// ---------------------------------------------------------- rows that see nothing --

/// Rows the mask leaves empty are exactly zero with lse = -inf; the other rows
/// match the fp64 reference.
template <class T, class Mask, class Mod = attn::NoScoreMod>
void expect_empty_rows_zero(const Problem& p, const Mask& mask,
                            const std::function<bool(index_t, index_t, index_t)>& empty,
                            const Mod& mod = {}) {
  SCOPED_TRACE(p.str());
  const Inputs<T> in(p, 61);
  std::vector<float> lse_ref;
  const Tensor<double> ref = reference_output(in, p, mask, mod, {}, &lse_ref);
  const Result<T> r = fast(in, p, mask, mod);
  index_t empties = 0;
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < p.Hq; ++h)
      for (index_t i = 0; i < p.Lq; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * p.Hq + h) * p.Lq + i);
        if (!empty(b, h, i)) {
          ASSERT_TRUE(std::isfinite(r.lse[row]));
          continue;
        }
        ++empties;
        ASSERT_EQ(r.lse[row], -std::numeric_limits<float>::infinity()) << "row " << row;
        ASSERT_EQ(lse_ref[row], -std::numeric_limits<float>::infinity()) << "row " << row;
        for (index_t c = 0; c < p.Dv; ++c) {
          ASSERT_EQ(static_cast<double>(r.out(b, h, i, c)), 0.0);
          ASSERT_EQ(ref(b, h, i, c), 0.0);
        }
      }
  EXPECT_GT(empties, 0);
  const double tol = eps<T>() * std::max(max_abs(ref), 1.0) +
                     tolerance<attn::detail::accum_t<T>>(p.D, p.Lk, max_abs(in.v));
  EXPECT_LE(max_abs_diff(r.out, ref), tol);
}

TYPED_TEST(EveryStorage, FullyMaskedRowsAreZeroWithMinusInfLse) {
  using T = TypeParam;
  using Row = std::function<bool(index_t, index_t, index_t)>;
  // Key padding with a zero length: batch 1 sees nothing.
  const Problem p = make(2, 2, 1, 40, 300, 16, 16);
  expect_empty_rows_zero<T>(p, attn::key_padding({300, 0}),
                            Row([](index_t b, index_t, index_t) { return b == 1; }));
  // Bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing.
  const Problem tall = make(1, 2, 2, 300, 120, 16, 16);
  const Row first_rows = [](index_t, index_t, index_t i) { return i < 180; };
  expect_empty_rows_zero<T>(tall, attn::causal(), first_rows);
  // The same with score modifiers: they never resurrect a masked row.
  expect_empty_rows_zero<T>(tall, attn::causal(), first_rows,
                            attn::compose(attn::alibi(attn::alibi_slopes(2)), attn::softcap(3.0)));
  // A boolean mask whose rows 3 and 200 are all false, and a custom predicate.
  const Problem sq = make(1, 1, 1, 260, 260, 8, 8);
  const std::unique_ptr<bool[]> keep(new bool[static_cast<std::size_t>(sq.Lq * sq.Lk)]);
  for (index_t i = 0; i < sq.Lq; ++i)
    for (index_t k = 0; k < sq.Lk; ++k)
      keep[static_cast<std::size_t>(i * sq.Lk + k)] = i != 3 && i != 200;
  const auto view = attn::bhsd(static_cast<const bool*>(keep.get()), 1, 1, sq.Lq, sq.Lk);
  const Row two_rows = [](index_t, index_t, index_t i) { return i == 3 || i == 200; };
  expect_empty_rows_zero<T>(sq, attn::bool_mask(view), two_rows);
  expect_empty_rows_zero<T>(
      sq, attn::causal() & attn::custom_mask([](index_t, index_t, index_t q, index_t) {
            return q != 3 && q != 200;
          }),
      two_rows);
}

// An additive bias of -inf on a key is the same as masking it; a row whose
// every key has -inf bias is an empty row.
TYPED_TEST(EveryStorage, MinusInfBiasIsAMask) {
  using T = TypeParam;
  const Problem p = make(1, 2, 2, 50, 70, 16, 16);
  std::vector<float> bias(static_cast<std::size_t>(p.Lq * p.Lk), 0.f);
  for (index_t i = 0; i < p.Lq; ++i)
    for (index_t j = 0; j < p.Lk; ++j)
      if (i == 10 || j > i + 20)
        bias[static_cast<std::size_t>(i * p.Lk + j)] = -std::numeric_limits<float>::infinity();
  const auto mod =
      attn::additive_bias(attn::bhsd(static_cast<const float*>(bias.data()), 1, 1, p.Lq, p.Lk));
  expect_empty_rows_zero<T>(
      p, attn::no_mask(), [](index_t, index_t, index_t i) { return i == 10; }, mod);
  const Inputs<T> in(p, 61);
  const Result<T> with_bias = fast(in, p, attn::no_mask(), mod);
  const Result<T> with_mask =
      fast(in, p, attn::custom_mask([](index_t, index_t, index_t q, index_t k) {
             return q != 10 && k <= q + 20;
           }));
  EXPECT_TRUE(with_bias.out.buf == with_mask.out.buf);
}

// -------------------------------------------------------- all-equal scores --

// q = 0 makes every score 0: each row is the plain mean of the value rows it
// sees, in every storage type.
TYPED_TEST(EveryStorage, EqualScoresGiveTheMeanOfTheValues) {
  using T = TypeParam;
  const Problem p = make(1, 2, 1, 33, 301, 16, 20);
  Inputs<T> in(p, 63);
  for (auto& x : in.q.buf) x = T(0);
  const Result<T> r = fast(in, p, attn::causal());
  double worst = 0;
  for (index_t h = 0; h < p.Hq; ++h)
    for (index_t i = 0; i < p.Lq; ++i) {
      const index_t seen = i + p.Lk - p.Lq + 1;  // keys 0 .. i + (Lk - Lq)
      ASSERT_NEAR(r.lse[static_cast<std::size_t>(h * p.Lq + i)],
                  std::log(static_cast<double>(seen)), 1e-6 * std::log(static_cast<double>(seen)));
      for (index_t c = 0; c < p.Dv; ++c) {
        double mean = 0;
        for (index_t j = 0; j < seen; ++j) mean += static_cast<double>(in.v(0, 0, j, c));
        mean /= static_cast<double>(seen);
        worst = std::max(worst, std::abs(static_cast<double>(r.out(0, h, i, c)) - mean));
      }
    }
  EXPECT_LE(worst, eps<T>() * max_abs(in.v) +
                       tolerance<attn::detail::accum_t<T>>(p.D, p.Lk, max_abs(in.v)));
}

}  // namespace
