// Every argument check of the softmax-attention entry points: each bad
// argument throws attn::Error whose message names it with the numbers, and
// nothing is written (the output and lse buffers keep every byte).
#include "support.hpp"
#include "type_names.hpp"

#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace attn_test;
using attn::Tensor4;
using attn::TensorView;

// ------------------------------------------------------------ the setup --

/// One valid problem whose q, k, v and out live one after another in a single
/// arena (with slack after them), so overlapping views are easy to make and
/// "nothing was written" is one byte comparison of the arena and the lse buffer.
template <class T>
struct Setup {
  static constexpr index_t B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6;
  static constexpr index_t q_size = B * Hq * Lq * D, k_size = B * Hkv * Lk * D,
                           v_size = B * Hkv * Lk * Dv, out_size = B * Hq * Lq * Dv;

  std::vector<T> arena;
  std::vector<float> lse_buf;
  std::unique_ptr<bool[]> mask_buf;  // storage for mask views (std::vector<bool> has no data())
  std::vector<float> bias_buf;
  Tensor4<const T> q, k, v;
  Tensor4<T> out;
  attn::AttentionOptions opt;

  Setup()
      : arena(static_cast<std::size_t>(2 * (q_size + k_size + v_size + out_size))),
        lse_buf(static_cast<std::size_t>(4 * B * Hq * Lq)),
        mask_buf(new bool[static_cast<std::size_t>(4 * B * Hq * Lq * Lk)]()),
        bias_buf(static_cast<std::size_t>(4 * B * Hq * Lq * Lk), 0.5f) {
    std::mt19937 gen(17);
    std::normal_distribution<double> dist(0.0, 1.0);
    for (auto& x : arena) x = static_cast<T>(dist(gen));
    for (auto& x : lse_buf) x = static_cast<float>(dist(gen));
    const T* base = arena.data();
    q = attn::bhsd(base + q_offset(), B, Hq, Lq, D);
    k = attn::bhsd(base + k_offset(), B, Hkv, Lk, D);
    v = attn::bhsd(base + v_offset(), B, Hkv, Lk, Dv);
    out = attn::bhsd(arena.data() + out_offset(), B, Hq, Lq, Dv);
  }
  static index_t q_offset() { return 0; }
  static index_t k_offset() { return q_size; }
  static index_t v_offset() { return q_size + k_size; }
  static index_t out_offset() { return q_size + k_size + v_size; }
  /// Free arena space after out, for views of other shapes.
  T* slack() { return arena.data() + out_offset() + out_size; }

  TensorView<float, 3> lse() { return TensorView<float, 3>(lse_buf.data(), {B, Hq, Lq}); }
  Tensor4<const bool> mask_view(index_t b, index_t h, index_t lq, index_t lk) const {
    return attn::bhsd(static_cast<const bool*>(mask_buf.get()), b, h, lq, lk);
  }
  Tensor4<const float> bias_view(index_t b, index_t h, index_t lq, index_t lk) const {
    return attn::bhsd(bias_buf.data(), b, h, lq, lk);
  }
};

/// Bytes of everything an entry point may write.
template <class T>
std::vector<unsigned char> snapshot(const Setup<T>& s) {
  std::vector<unsigned char> bytes(s.arena.size() * sizeof(T) + s.lse_buf.size() * sizeof(float));
  std::memcpy(bytes.data(), s.arena.data(), s.arena.size() * sizeof(T));
  std::memcpy(bytes.data() + s.arena.size() * sizeof(T), s.lse_buf.data(),
              s.lse_buf.size() * sizeof(float));
  return bytes;
}

/// Runs `call`, expects attn::Error whose message contains `needle`, and
/// that no byte of the arena or the lse buffer changed.
template <class T>
void expect_error(Setup<T>& s, const std::string& entry, const std::function<void()>& call,
                  const std::string& needle) {
  SCOPED_TRACE(entry);
  const std::vector<unsigned char> before = snapshot(s);
  try {
    call();
    ADD_FAILURE() << "no attn::Error thrown; expected one containing \"" << needle << "\"";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
    EXPECT_EQ(std::string(e.what()).rfind("attn: ", 0), 0u) << e.what();
  }
  EXPECT_TRUE(snapshot(s) == before) << "an output buffer was written before the error";
}

/// Every entry point that takes (q, k, v, out, mask, mod, opt) rejects the
/// arguments; scaled_dot_product_attention too when there is no mask or modifier.
template <class T, class Q, class K, class V, class O, class Mask = attn::NoMask,
          class Mod = attn::NoScoreMod>
void expect_rejected(Setup<T>& s, const Q& q, const K& k, const V& v, const O& out,
                     const std::string& needle, const Mask& mask = {}, const Mod& mod = {}) {
  const attn::AttentionOptions opt = s.opt;
  if constexpr (std::is_same<Mask, attn::NoMask>::value &&
                std::is_same<Mod, attn::NoScoreMod>::value)
    expect_error(
        s, "scaled_dot_product_attention",
        [&] { attn::scaled_dot_product_attention(q, k, v, out, opt); }, needle);
  expect_error(
      s, "masked_attention", [&] { attn::masked_attention(q, k, v, out, mask, mod, opt); }, needle);
  expect_error(
      s, "reference::attention", [&] { attn::reference::attention(q, k, v, out, mask, mod, opt); },
      needle);
}

template <class T>
class Errors : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(Errors, StorageTypes, StorageTypeNames);

// The setup itself is valid: every entry point accepts it (so each test
// below fails for the one reason it names).
TYPED_TEST(Errors, ValidSetupIsAccepted) {
  Setup<TypeParam> s;
  s.opt.lse = s.lse();
  EXPECT_NO_THROW(attn::scaled_dot_product_attention(s.q, s.k, s.v, s.out, s.opt));
  EXPECT_NO_THROW(attn::masked_attention(s.q, s.k, s.v, s.out, attn::causal(), s.opt));
  EXPECT_NO_THROW(attn::reference::attention(s.q, s.k, s.v, s.out, attn::no_mask(),
                                             attn::no_score_mod(), s.opt));
}

// ------------------------------------------------------------- extents --

TYPED_TEST(Errors, ZeroOrNegativeExtentOfEveryTensor) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  for (index_t bad : {0, -1}) {
    const std::string b = std::to_string(bad);
    expect_rejected(
        s, attn::bhsd(s.q.data(), S::B, S::Hq, bad, S::D), s.k, s.v, s.out,
        "q has shape [2, 4, " + b + ", 3]: dimension 2 is " + b + ", every dimension must be > 0");
    expect_rejected(s, s.q, attn::bhsd(s.k.data(), bad, S::Hkv, S::Lk, S::D), s.v, s.out,
                    "k has shape [" + b + ", 2, 7, 3]: dimension 0 is " + b);
    expect_rejected(s, s.q, s.k, attn::bhsd(s.v.data(), S::B, S::Hkv, S::Lk, bad), s.out,
                    "v has shape [2, 2, 7, " + b + "]: dimension 3 is " + b);
    expect_rejected(s, s.q, s.k, s.v, attn::bhsd(s.out.data(), S::B, bad, S::Lq, S::Dv),
                    "out has shape [2, " + b + ", 5, 6]: dimension 1 is " + b);
  }
}

TYPED_TEST(Errors, NullDataWithNonZeroExtent) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  const T* none = nullptr;
  expect_rejected(s, attn::bhsd(none, S::B, S::Hq, S::Lq, S::D), s.k, s.v, s.out,
                  "q has null data but shape [2, 4, 5, 3]");
  expect_rejected(s, s.q, attn::bhsd(none, S::B, S::Hkv, S::Lk, S::D), s.v, s.out,
                  "k has null data but shape [2, 2, 7, 3]");
  expect_rejected(s, s.q, s.k, attn::bhsd(none, S::B, S::Hkv, S::Lk, S::Dv), s.out,
                  "v has null data but shape [2, 2, 7, 6]");
  expect_rejected(s, s.q, s.k, s.v, attn::bhsd(static_cast<T*>(nullptr), S::B, S::Hq, S::Lq, S::Dv),
                  "out has null data but shape [2, 4, 5, 6]");
}

// --------------------------------------------------- shapes that disagree --

TYPED_TEST(Errors, BatchMismatch) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  expect_rejected(s, s.q, attn::bhsd(s.slack(), 3, S::Hkv, S::Lk, S::D), s.v, s.out,
                  "k has batch 3, but q has batch 2");
  expect_rejected(s, s.q, s.k, attn::bhsd(s.v.data(), 1, S::Hkv, S::Lk, S::Dv), s.out,
                  "v has batch 1, but q has batch 2");
}

TYPED_TEST(Errors, HeadDimMismatch) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  expect_rejected(s, s.q, attn::bhsd(s.slack(), S::B, S::Hkv, S::Lk, 4), s.v, s.out,
                  "k has head dim 4, but q has head dim 3");
}

TYPED_TEST(Errors, KeyValueHeadsOrLengthsDisagree) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  expect_rejected(s, s.q, s.k, attn::bhsd(s.v.data(), S::B, 1, S::Lk, S::Dv), s.out,
                  "v has 1 heads, but k has 2");
  expect_rejected(s, s.q, s.k, attn::bhsd(s.v.data(), S::B, S::Hkv, 6, S::Dv), s.out,
                  "v has length 6, but k has length 7");
}

TYPED_TEST(Errors, KeyHeadsMustDivideQueryHeads) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  const T* kv = s.slack();
  expect_rejected(s, s.q, attn::bhsd(kv, S::B, 3, S::Lk, S::D),
                  attn::bhsd(kv, S::B, 3, S::Lk, S::Dv), s.out,
                  "k has 3 heads, which does not divide q's 4 heads");
  expect_rejected(s, s.q, attn::bhsd(kv, S::B, 8, S::Lk, S::D),
                  attn::bhsd(kv, S::B, 8, S::Lk, S::Dv), s.out,
                  "k has 8 heads, which does not divide q's 4 heads");
}

TYPED_TEST(Errors, OutputShapeMustMatch) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  T* o = s.out.data();
  const std::string expected = ", expected [2, 4, 5, 6] (batch, q heads, Lq, Dv)";
  expect_rejected(s, s.q, s.k, s.v, attn::bhsd(o, 1, S::Hq, S::Lq, S::Dv),
                  "out has shape [1, 4, 5, 6]" + expected);
  expect_rejected(s, s.q, s.k, s.v, attn::bhsd(o, S::B, 2, S::Lq, S::Dv),
                  "out has shape [2, 2, 5, 6]" + expected);
  expect_rejected(s, s.q, s.k, s.v, attn::bhsd(o, S::B, S::Hq, 4, S::Dv),
                  "out has shape [2, 4, 4, 6]" + expected);
  expect_rejected(s, s.q, s.k, s.v, attn::bhsd(o, S::B, S::Hq, S::Lq, 3),
                  "out has shape [2, 4, 5, 3]" + expected);
}

// ---------------------------------------------------------------- memory --

TYPED_TEST(Errors, OutputThatOverlapsItself) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  // Rows 6 elements long but 4 apart: row 1 starts inside row 0.
  const Tensor4<T> rows_overlap(s.out.data(), {S::B, S::Hq, S::Lq, S::Dv},
                                {S::Hq * S::Lq * S::Dv, S::Lq * S::Dv, 4, 1});
  expect_rejected(s, s.q, s.k, s.v, rows_overlap,
                  "out has shape [2, 4, 5, 6] and strides [120, 30, 4, 1], which map two "
                  "elements to one address (dimension 2)");
  // A zero stride (broadcast) is fine to read but not to write.
  const Tensor4<T> broadcast(s.out.data(), {S::B, S::Hq, S::Lq, S::Dv},
                             {0, S::Lq * S::Dv, S::Dv, 1});
  expect_rejected(s, s.q, s.k, s.v, broadcast,
                  "out has shape [2, 4, 5, 6] and strides [0, 30, 6, 1], which map two "
                  "elements to one address (dimension 0)");
}

TYPED_TEST(Errors, OutputThatOverlapsAnInput) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  // out exactly on q (in-place), and out starting in the middle of k and of v.
  const Tensor4<T> on_q = attn::bhsd(s.arena.data() + S::q_offset(), S::B, S::Hq, S::Lq, S::Dv);
  expect_rejected(s, s.q, s.k, s.v, on_q, "out overlaps q: out spans bytes [");
  const Tensor4<T> in_k =
      attn::bhsd(s.arena.data() + S::k_offset() + S::k_size - 1, S::B, S::Hq, S::Lq, S::Dv);
  expect_rejected(s, s.q, s.k, s.v, in_k, "out overlaps k: out spans bytes [");
  // q, k, v views moved to the slack so only v meets out.
  const T* hi = s.slack() + S::out_size;
  const Tensor4<const T> q2 = attn::bhsd(hi, S::B, S::Hq, S::Lq, S::D);
  const Tensor4<const T> k2 = attn::bhsd(hi + S::q_size, S::B, S::Hkv, S::Lk, S::D);
  const Tensor4<const T> v_on_out = attn::bhsd(s.out.data() + 5, S::B, S::Hkv, S::Lk, S::Dv);
  expect_rejected(s, q2, k2, v_on_out, s.out, "out overlaps v: out spans bytes [");
  // The byte ranges in the message are the real ones.
  const auto lo = reinterpret_cast<std::uintptr_t>(s.out.data());
  const auto hi_byte = lo + static_cast<std::uintptr_t>(S::out_size) * sizeof(T);
  expect_rejected(s, q2, k2, v_on_out, s.out,
                  "out spans bytes [" + std::to_string(lo) + ", " + std::to_string(hi_byte) + ")");
}

// ------------------------------------------------------------- options --

TYPED_TEST(Errors, ScaleMustBeFinite) {
  Setup<TypeParam> s;
  s.opt.scale = std::numeric_limits<double>::quiet_NaN();
  expect_rejected(s, s.q, s.k, s.v, s.out, "scale is nan, must be finite");
  s.opt.scale = std::numeric_limits<double>::infinity();
  expect_rejected(s, s.q, s.k, s.v, s.out, "scale is inf, must be finite");
  s.opt.scale = -std::numeric_limits<double>::infinity();
  expect_rejected(s, s.q, s.k, s.v, s.out, "scale is -inf, must be finite");
}

TYPED_TEST(Errors, NegativeThreadsOrBlockSizes) {
  Setup<TypeParam> s;
  s.opt.num_threads = -2;
  expect_rejected(s, s.q, s.k, s.v, s.out, "num_threads is -2, must be >= 0");
  s.opt = {};
  s.opt.block_q = -3;
  expect_rejected(s, s.q, s.k, s.v, s.out, "block_q is -3, must be >= 0 (0 = automatic)");
  s.opt = {};
  s.opt.block_k = -5;
  expect_rejected(s, s.q, s.k, s.v, s.out, "block_k is -5, must be >= 0 (0 = automatic)");
}

// ------------------------------------------------------------------ lse --

TYPED_TEST(Errors, LseOfTheWrongShape) {
  Setup<TypeParam> s;
  const std::string expected = ", expected [2, 4, 5] (batch, q heads, Lq)";
  for (const auto& shape : {std::array<index_t, 3>{1, 4, 5}, std::array<index_t, 3>{2, 2, 5},
                            std::array<index_t, 3>{2, 4, 4}, std::array<index_t, 3>{2, 4, 0}}) {
    s.opt.lse = TensorView<float, 3>(s.lse_buf.data(), shape);
    expect_rejected(s, s.q, s.k, s.v, s.out,
                    "lse has shape [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) +
                        ", " + std::to_string(shape[2]) + "]" + expected);
  }
}

TYPED_TEST(Errors, LseWithNullData) {
  Setup<TypeParam> s;
  s.opt.lse = TensorView<float, 3>(nullptr, {2, 4, 5});
  expect_rejected(s, s.q, s.k, s.v, s.out, "lse has null data but shape [2, 4, 5]");
}

TYPED_TEST(Errors, LseThatOverlapsItself) {
  Setup<TypeParam> s;
  // Heads 2 apart but rows 5 long: head 1 starts inside head 0.
  s.opt.lse = TensorView<float, 3>(s.lse_buf.data(), {2, 4, 5}, {20, 2, 1});
  expect_rejected(s, s.q, s.k, s.v, s.out,
                  "lse has shape [2, 4, 5] and strides [20, 2, 1], which map two elements to "
                  "one address (dimension 1)");
}

TYPED_TEST(Errors, LseThatOverlapsAnInputOrTheOutput) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  // lse is float; point it into the arena of T (never dereferenced: the check comes first).
  auto lse_at = [&](index_t offset) {
    return TensorView<float, 3>(reinterpret_cast<float*>(s.arena.data() + offset), {2, 4, 5});
  };
  const std::pair<index_t, const char*> cases[] = {{S::q_offset(), "q"},
                                                   {S::k_offset() + 2, "k"},
                                                   {S::v_offset() + 2, "v"},
                                                   {S::out_offset() + 4, "out"}};
  for (const auto& [offset, name] : cases) {
    s.opt.lse = lse_at(offset);
    expect_rejected(s, s.q, s.k, s.v, s.out,
                    std::string("lse overlaps ") + name + ": lse spans bytes [");
  }
}

// ---------------------------------------------------------------- masks --

TYPED_TEST(Errors, KeyPaddingLengths) {
  Setup<TypeParam> s;
  expect_rejected(s, s.q, s.k, s.v, s.out, "key_padding has 3 lengths, but the batch is 2",
                  attn::key_padding({7, 7, 7}));
  expect_rejected(s, s.q, s.k, s.v, s.out,
                  "key_padding length of batch 1 is 8, outside [0, Lk = 7]",
                  attn::key_padding({7, 8}));
  expect_rejected(s, s.q, s.k, s.v, s.out,
                  "key_padding length of batch 0 is -1, outside [0, Lk = 7]",
                  attn::key_padding(std::vector<int>{-1, 3}));
}

TYPED_TEST(Errors, BoolMaskViews) {
  Setup<TypeParam> s;
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has null data",
                  attn::bool_mask(Tensor4<const bool>()));
  const std::string expected = ", expected [2 or 1, 4 or 1, 5 or 1, 7]";
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has shape [3, 4, 5, 7]" + expected,
                  attn::bool_mask(s.mask_view(3, 4, 5, 7)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has shape [1, 2, 5, 7]" + expected,
                  attn::bool_mask(s.mask_view(1, 2, 5, 7)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has shape [2, 4, 7, 5]" + expected,
                  attn::bool_mask(s.mask_view(2, 4, 7, 5)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has shape [1, 1, 5, 6]" + expected,
                  attn::bool_mask(s.mask_view(1, 1, 5, 6)));
}

// A check inside one side of `&` still fires.
TYPED_TEST(Errors, ConjunctionChecksBothSides) {
  Setup<TypeParam> s;
  expect_rejected(s, s.q, s.k, s.v, s.out, "key_padding has 1 lengths, but the batch is 2",
                  attn::causal() & attn::key_padding({3}));
  expect_rejected(s, s.q, s.k, s.v, s.out, "bool_mask has shape [1, 1, 5, 8]",
                  attn::key_padding({3, 4}) & attn::bool_mask(s.mask_view(1, 1, 5, 8)));
}

// --------------------------------------------------------- score modifiers --

TYPED_TEST(Errors, AdditiveBiasViews) {
  Setup<TypeParam> s;
  const attn::NoMask none;
  expect_rejected(s, s.q, s.k, s.v, s.out, "additive_bias has null data", none,
                  attn::additive_bias(Tensor4<const float>()));
  const std::string expected = ", expected [2 or 1, 4 or 1, 5 or 1, 7]";
  expect_rejected(s, s.q, s.k, s.v, s.out, "additive_bias has shape [4, 4, 5, 7]" + expected, none,
                  attn::additive_bias(s.bias_view(4, 4, 5, 7)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "additive_bias has shape [2, 3, 5, 7]" + expected, none,
                  attn::additive_bias(s.bias_view(2, 3, 5, 7)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "additive_bias has shape [1, 1, 3, 7]" + expected, none,
                  attn::additive_bias(s.bias_view(1, 1, 3, 7)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "additive_bias has shape [1, 1, 5, 1]" + expected, none,
                  attn::additive_bias(s.bias_view(1, 1, 5, 1)));
}

TYPED_TEST(Errors, AlibiSlopes) {
  Setup<TypeParam> s;
  const attn::NoMask none;
  expect_rejected(s, s.q, s.k, s.v, s.out, "alibi has 3 slopes, but q has 4 heads", none,
                  attn::alibi(attn::alibi_slopes(3)));
  std::vector<double> slopes = attn::alibi_slopes(4);
  slopes[2] = std::numeric_limits<double>::infinity();
  expect_rejected(s, s.q, s.k, s.v, s.out, "alibi slope of head 2 is inf", none,
                  attn::alibi(slopes));
  slopes[2] = 0.5;
  slopes[3] = std::numeric_limits<double>::quiet_NaN();
  expect_rejected(s, s.q, s.k, s.v, s.out, "alibi slope of head 3 is nan", none,
                  attn::alibi(slopes));
}

TYPED_TEST(Errors, SoftcapMustBeFiniteAndPositive) {
  Setup<TypeParam> s;
  const attn::NoMask none;
  expect_rejected(s, s.q, s.k, s.v, s.out, "softcap cap is 0, must be finite and > 0", none,
                  attn::softcap(0));
  expect_rejected(s, s.q, s.k, s.v, s.out, "softcap cap is -30, must be finite and > 0", none,
                  attn::softcap(-30));
  expect_rejected(s, s.q, s.k, s.v, s.out, "softcap cap is nan, must be finite and > 0", none,
                  attn::softcap(std::numeric_limits<double>::quiet_NaN()));
  expect_rejected(s, s.q, s.k, s.v, s.out, "softcap cap is inf, must be finite and > 0", none,
                  attn::softcap(std::numeric_limits<double>::infinity()));
}

// A check inside a composition still fires, whichever position it holds.
TYPED_TEST(Errors, CompositionChecksEveryModifier) {
  Setup<TypeParam> s;
  expect_rejected(s, s.q, s.k, s.v, s.out, "softcap cap is 0", attn::causal(),
                  attn::compose(attn::alibi(attn::alibi_slopes(4)), attn::softcap(0)));
  expect_rejected(s, s.q, s.k, s.v, s.out, "alibi has 2 slopes, but q has 4 heads", attn::causal(),
                  attn::compose(attn::softcap(20), attn::alibi(attn::alibi_slopes(2))));
}

// ------------------------------------------------ views read by policies --

// The output (and lse) must not overlap a mask or bias view either: the
// engine would read scores' inputs that it has already overwritten.
TYPED_TEST(Errors, OutputOrLseThatOverlapsAMaskOrBiasView) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  const attn::NoMask none;
  const auto bias_on_out =
      attn::additive_bias(attn::bhsd(static_cast<const T*>(s.out.data()) + 7, 1, 1, S::Lq, S::Lk));
  expect_rejected(s, s.q, s.k, s.v, s.out, "out overlaps additive_bias: out spans bytes [", none,
                  bias_on_out);
  expect_rejected(s, s.q, s.k, s.v, s.out, "out overlaps additive_bias", attn::causal(),
                  attn::compose(attn::softcap(10.0), bias_on_out));
  // Never read: the check comes first.
  const auto mask_on_out = attn::bool_mask(
      attn::bhsd(reinterpret_cast<const bool*>(s.out.data()), 1, S::Hq, S::Lq, S::Lk));
  expect_rejected(s, s.q, s.k, s.v, s.out, "out overlaps bool_mask: out spans bytes [",
                  mask_on_out);
  expect_rejected(s, s.q, s.k, s.v, s.out, "out overlaps bool_mask",
                  attn::key_padding({7, 7}) & mask_on_out);
  // lse on top of a bias, the output clear of it.
  s.opt.lse = s.lse();
  const auto bias_on_lse = attn::additive_bias(
      attn::bhsd(static_cast<const float*>(s.lse_buf.data()), 1, 1, S::Lq, S::Lk));
  expect_rejected(s, s.q, s.k, s.v, s.out, "lse overlaps additive_bias: lse spans bytes [", none,
                  bias_on_lse);
  // A mask and a bias on the same (read-only) memory are fine.
  s.opt = {};
  const auto shared = attn::bhsd(static_cast<const float*>(s.bias_buf.data()), 1, 1, S::Lq, S::Lk);
  EXPECT_NO_THROW(attn::masked_attention(
      s.q, s.k, s.v, s.out, attn::no_mask(),
      attn::compose(attn::additive_bias(shared), attn::additive_bias(shared))));
}

// Shape checks come before the mask and modifier checks, and the first
// failing check is the one reported.
TYPED_TEST(Errors, FirstFailingCheckIsReported) {
  using T = TypeParam;
  Setup<T> s;
  using S = Setup<T>;
  s.opt.scale = std::numeric_limits<double>::quiet_NaN();
  expect_rejected(s, s.q, attn::bhsd(s.slack(), S::B, S::Hkv, S::Lk, 4), s.v, s.out,
                  "k has head dim 4, but q has head dim 3", attn::key_padding({1}),
                  attn::softcap(0));
}

}  // namespace
