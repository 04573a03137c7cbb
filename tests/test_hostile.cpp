// Hostile input: arguments an attacker (or a bug upstream) would pass, one
// table per class. Each refused call must throw attn::Error with the message
// given and leave every byte the call could write unchanged (one arena holds
// all the tensors, inputs included, plus the mask bytes and the stats).
//
//   1. sizes, strides and offsets whose arithmetic overflows 64 bits
//   2. outputs that alias a view a policy reads, or a stats struct inside an input
//   3. numeric parameters finite as double but infinite in the accumulation type
//   4. semantics: NaN rows, non-positive ALiBi head counts
//   5. exceptions thrown by user callbacks inside parallel regions
#include <attn/attn.hpp>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

namespace {

using attn::index_t;
using attn::Tensor4;
using attn::TensorView;

constexpr index_t kBig = index_t{1} << 62;
constexpr index_t kMax = std::numeric_limits<index_t>::max();

/// One valid problem (float) whose tensors all live in one arena.
struct World {
  static constexpr index_t B = 2, Hq = 2, Hkv = 1, Lq = 5, Lk = 6, D = 4, Dv = 3;
  static constexpr index_t q_n = B * Hq * Lq * D, k_n = B * Hkv * Lk * D, v_n = B * Hkv * Lk * Dv,
                           out_n = B * Hq * Lq * Dv, lse_n = B * Hq * Lq, w_n = B * Hq * Lq * Lk,
                           bias_n = B * Hq * Lq * Lk;
  std::vector<float> arena;
  std::unique_ptr<bool[]> mask_buf;
  attn::AttentionStats stats;

  World()
      : arena(static_cast<std::size_t>(q_n + k_n + v_n + out_n + lse_n + w_n + bias_n + 256)),
        mask_buf(new bool[static_cast<std::size_t>(B * Hq * Lq * Lk)]) {
    std::mt19937 gen(5);
    std::normal_distribution<float> dist(0.f, 1.f);
    for (auto& x : arena) x = dist(gen);
    for (index_t i = 0; i < B * Hq * Lq * Lk; ++i) mask_buf[static_cast<std::size_t>(i)] = i % 3;
    stats.scores = 12345;
  }
  float* at(index_t offset) { return arena.data() + offset; }
  Tensor4<const float> q() { return attn::bhsd(static_cast<const float*>(at(0)), B, Hq, Lq, D); }
  Tensor4<const float> k() { return attn::bhsd(static_cast<const float*>(at(q_n)), B, Hkv, Lk, D); }
  Tensor4<const float> v() {
    return attn::bhsd(static_cast<const float*>(at(q_n + k_n)), B, Hkv, Lk, Dv);
  }
  float* out_p() { return at(q_n + k_n + v_n); }
  Tensor4<float> out() { return attn::bhsd(out_p(), B, Hq, Lq, Dv); }
  TensorView<float, 3> lse() {
    return TensorView<float, 3>(at(q_n + k_n + v_n + out_n), {B, Hq, Lq});
  }
  float* w_p() { return at(q_n + k_n + v_n + out_n + lse_n); }
  Tensor4<float> weights() { return attn::bhsd(w_p(), B, Hq, Lq, Lk); }
  float* bias_p() { return at(q_n + k_n + v_n + out_n + lse_n + w_n); }
  Tensor4<const float> bias() {
    return attn::bhsd(static_cast<const float*>(bias_p()), B, Hq, Lq, Lk);
  }
  Tensor4<const bool> mask() {
    return attn::bhsd(static_cast<const bool*>(mask_buf.get()), B, Hq, Lq, Lk);
  }

  std::vector<unsigned char> bytes() const {
    const auto* a = reinterpret_cast<const unsigned char*>(arena.data());
    const auto* m = reinterpret_cast<const unsigned char*>(mask_buf.get());
    const auto* st = reinterpret_cast<const unsigned char*>(&stats);
    std::vector<unsigned char> r(a, a + arena.size() * sizeof(float));
    r.insert(r.end(), m, m + w_n);
    r.insert(r.end(), st, st + sizeof stats);
    return r;
  }
};

/// A view of `base` whose dimension 0 steps onto `target` modulo 2^64 bytes:
/// element offset (target - base) + 2^62 floats is 2^64 + (target - base)·4 bytes.
Tensor4<float> wrapping_onto(float* base, const float* target, const std::array<index_t, 4>& shape,
                             std::array<index_t, 4> strides) {
  strides[0] = static_cast<index_t>(target - base) + kBig;
  return Tensor4<float>(base, shape, strides);
}

struct Case {
  const char* name;
  std::function<void(World&)> call;
  std::string needle;
};

/// Every case throws attn::Error containing its needle and writes nothing.
void run_table(const std::vector<Case>& table) {
  for (const Case& c : table) {
    SCOPED_TRACE(c.name);
    World w;
    const std::vector<unsigned char> before = w.bytes();
    try {
      c.call(w);
      ADD_FAILURE() << "accepted; expected an attn::Error containing \"" << c.needle << "\"";
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos)
          << "message: " << e.what() << "\nexpected to contain: " << c.needle;
      EXPECT_EQ(std::string(e.what()).rfind("attn: ", 0), 0u) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw " << typeid(e).name() << ": " << e.what();
    }
    EXPECT_TRUE(w.bytes() == before) << "a byte was written before the error";
  }
}

using W = World;

/// φ(x) = |x|: F = D.
struct AbsMap : attn::SimpleFeatureMap<AbsMap> {
  index_t num_features(index_t d) const { return d; }
  template <class Acc>
  void features(attn::FeatureInput<Acc> x, attn::FeatureOutput<Acc> phi) const {
    phi.array() = x.array().abs();
  }
};

// ------------------------------------------------------ 1. overflow --

TEST(Hostile, OverflowingSizesStridesAndOffsets) {
  const std::array<index_t, 4> out_shape{W::B, W::Hq, W::Lq, W::Dv};
  const std::array<index_t, 4> out_strides{W::Hq * W::Lq * W::Dv, W::Lq * W::Dv, W::Dv, 1};
  run_table({
      {"out whose batch stride wraps onto q (masked_attention)",
       [&](W& w) {
         attn::masked_attention(w.q(), w.k(), w.v(),
                                wrapping_onto(w.out_p(), w.at(0), out_shape, out_strides),
                                attn::causal());
       },
       "out has shape [2, 2, 5, 3] and strides [" +
           std::to_string(kBig - W::q_n - W::k_n - W::v_n) +
           ", 15, 3, 1], whose byte offsets overflow a 64-bit integer"},
      {"out whose batch stride wraps onto q (scaled_dot_product_attention)",
       [&](W& w) {
         attn::scaled_dot_product_attention(
             w.q(), w.k(), w.v(), wrapping_onto(w.out_p(), w.at(0), out_shape, out_strides));
       },
       "whose byte offsets overflow"},
      {"out whose batch stride wraps onto q (sparse_attention)",
       [&](W& w) {
         const auto layout = attn::BlockSparseLayout::local(W::Lq, 2, 1, 1);
         attn::BlockSparseLayout l2(2, 2, 3, 3, 1, layout.row_offsets(), layout.cols());
         attn::sparse_attention(w.q(), w.k(), w.v(),
                                wrapping_onto(w.out_p(), w.at(0), out_shape, out_strides), l2);
       },
       "whose byte offsets overflow"},
      {"out whose batch stride wraps onto q (linear_attention)",
       [&](W& w) {
         attn::linear_attention(w.q(), w.k(), w.v(),
                                wrapping_onto(w.out_p(), w.at(0), out_shape, out_strides),
                                attn::elu_plus_one());
       },
       "whose byte offsets overflow"},
      {"weights whose batch stride wraps onto q (attention_weights)",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(),
                                 wrapping_onto(w.w_p(), w.at(0), {W::B, W::Hq, W::Lq, W::Lk},
                                               {W::Hq * W::Lq * W::Lk, W::Lq * W::Lk, W::Lk, 1}));
       },
       "weights has shape [2, 2, 5, 6]"},
      {"lse whose batch stride wraps onto k",
       [&](W& w) {
         attn::AttentionOptions o;
         const auto l = w.lse();
         o.lse = TensorView<float, 3>(
             l.data(), l.shape(), {static_cast<index_t>(w.at(W::q_n) - l.data()) + kBig, W::Lq, 1});
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::no_mask(), o);
       },
       "lse has shape [2, 2, 5] and strides"},
      {"a linear state whose batch stride wraps onto v",
       [&](W& w) {
         std::vector<float> z(static_cast<std::size_t>(W::B * W::Hkv * W::D));
         float* s = w.at(W::q_n + W::k_n + W::v_n + W::out_n + W::lse_n + W::w_n + W::bias_n);
         attn::LinearState<float> st{
             Tensor4<float>(
                 s, {W::B, W::Hkv, W::D, W::Dv},
                 {static_cast<index_t>(w.at(W::q_n + W::k_n) - s) + kBig, W::D * W::Dv, W::Dv, 1}),
             TensorView<float, 3>(z.data(), {W::B, W::Hkv, W::D})};
         attn::linear_attention(w.q(), w.k(), w.v(), w.out(), AbsMap{}, st);
       },
       "state s has shape [2, 1, 4, 3] and strides"},
      {"q whose element offsets overflow",
       [&](W& w) {
         attn::masked_attention(
             Tensor4<const float>(w.at(0), {W::B, W::Hq, W::Lq, W::D}, {kBig, kBig, 1, 1}), w.k(),
             w.v(), w.out(), attn::causal());
       },
       "q has shape [2, 2, 5, 4] and strides [4611686018427387904, 4611686018427387904, 1, 1], "
       "whose element offsets overflow a 64-bit integer"},
      {"k with the most negative stride",
       [&](W& w) {
         attn::masked_attention(
             w.q(),
             Tensor4<const float>(w.at(W::q_n), {W::B, W::Hkv, W::Lk, W::D},
                                  {std::numeric_limits<index_t>::min(), 1, 1, 1}),
             w.v(), w.out(), attn::causal());
       },
       "k has shape [2, 1, 6, 4] and strides [-9223372036854775808, 1, 1, 1], whose"},
      {"v whose lowest element lies below address 0",
       [&](W& w) {
         const float* p = w.at(W::q_n + W::k_n);
         const auto below = static_cast<index_t>(reinterpret_cast<std::uintptr_t>(p) / 4) + 64;
         attn::masked_attention(w.q(), w.k(),
                                Tensor4<const float>(p, {W::B, W::Hkv, W::Lk, W::Dv},
                                                     {-below, W::Lk * W::Dv, W::Dv, 1}),
                                w.out(), attn::causal());
       },
       "whose lowest element lies below address 0"},
      {"q whose highest element lies past the end of the address space",
       [&](W& w) {
         const auto* top = reinterpret_cast<const float*>(~std::uintptr_t{0} - 63);
         attn::masked_attention(Tensor4<const float>(top, {W::B, W::Hq, W::Lq, W::D}), w.k(), w.v(),
                                w.out(), attn::causal());
       },
       "whose highest element lies past the end of the address space"},
      {"a null lse whose extents multiply to 2^64 is not taken as 'not given'",
       [&](W& w) {
         attn::AttentionOptions o;
         o.lse = TensorView<float, 3>(nullptr, {index_t{1} << 32, index_t{1} << 32, 1}, {0, 0, 0});
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::no_mask(), o);
       },
       "lse has shape [4294967296, 4294967296, 1], expected [2, 2, 5]"},
      {"a bool mask whose offsets overflow",
       [&](W& w) {
         attn::masked_attention(
             w.q(), w.k(), w.v(), w.out(),
             attn::bool_mask(Tensor4<const bool>(w.mask_buf.get(), {W::B, W::Hq, W::Lq, W::Lk},
                                                 {kBig, kBig, W::Lk, 1})));
       },
       "bool_mask has shape [2, 2, 5, 6] and strides [4611686018427387904"},
      {"an additive bias whose offsets overflow (attention_weights)",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(), w.weights(), attn::no_mask(),
                                 attn::additive_bias(Tensor4<const float>(
                                     w.bias_p(), {1, 1, W::Lq, W::Lk}, {0, 0, kMax, 1})));
       },
       "additive_bias has shape [1, 1, 5, 6] and strides [0, 0, 9223372036854775807, 1]"},
      {"k and v broadcast over 2^63 - 1 keys (stride 0): Lq + Lk overflows",
       [&](W& w) {
         const Tensor4<const float> k(w.at(W::q_n), {W::B, W::Hkv, kMax, W::D}, {W::D, W::D, 0, 1});
         const Tensor4<const float> v(w.at(W::q_n + W::k_n), {W::B, W::Hkv, kMax, W::Dv},
                                      {W::Dv, W::Dv, 0, 1});
         attn::sliding_window_attention(w.q(), k, v, w.out(), attn::window(kMax, kMax));
       },
       "Lq + Lk: 5 + 9223372036854775807 overflows a 64-bit integer"},
      {"RoPE positions past 2^63",
       [&](W& w) {
         attn::Rope r;
         r.offset = kMax - 2;
         attn::apply_rope(attn::bhsd(w.out_p(), W::B, W::Hq, W::Lq, W::Dv - 1), r);
       },
       "rope offset 9223372036854775805 plus 5 rows overflows a 64-bit position"},
      {"RoPE on a view whose offsets overflow",
       [&](W& w) {
         attn::apply_rope(Tensor4<float>(w.out_p(), {2, 2, 5, 2}, {kBig, 1, 2, 1}), attn::Rope{});
       },
       "x has shape [2, 2, 5, 2] and strides [4611686018427387904"},
      {"contiguous TensorView whose strides overflow",
       [&](W& w) {
         const Tensor4<float> t(w.out_p(),
                                {2, index_t{1} << 21, index_t{1} << 21, index_t{1} << 21});
         (void)t;
       },
       "a contiguous view of shape [2, 2097152, 2097152, 2097152] has a stride that overflows"},
      {"bhsd whose strides overflow", [&](W& w) { (void)attn::bhsd(w.out_p(), 1, kBig, 4, 1); },
       "has a stride that overflows"},
      {"bshd whose strides overflow", [&](W& w) { (void)attn::bshd(w.out_p(), 1, 4, kBig, 1); },
       "has a stride that overflows"},
      {"TensorView::size() of 2^66 elements",
       [&](W& w) {
         (void)Tensor4<float>(w.out_p(), {1 << 22, 1 << 22, 1 << 22, 1}, {0, 0, 0, 0}).size();
       },
       "a view of shape [4194304, 4194304, 4194304, 1] has more elements than a 64-bit integer "
       "holds"},
      {"LinearStateBuffer of 2^80 elements",
       [&](W&) { attn::LinearStateBuffer<float> b(1 << 20, 1 << 20, 1 << 20, 1 << 20); },
       "LinearStateBuffer batch · kv_heads · features · dv: 1152921504606846976 · 1048576 "
       "overflows"},
      {"LinearStateBuffer with a zero size",
       [&](W&) { attn::LinearStateBuffer<float> b(2, 0, 3, 4); },
       "LinearStateBuffer kv_heads is 0, must be > 0"},
      {"block mask of 2^64 entries (was: wraps to 0 and reads out of bounds)",
       [&](W&) {
         (void)attn::BlockSparseLayout::from_block_mask(1, 1, index_t{1} << 31, index_t{1} << 33,
                                                        {});
       },
       "block mask heads · q_blocks · k_blocks: 2147483648 · 8589934592 overflows"},
      {"layout with 2^80 rows",
       [&](W&) {
         (void)attn::BlockSparseLayout(1, 1, index_t{1} << 40, 1, index_t{1} << 40, {0}, {});
       },
       "block-sparse layout has 1099511627776 heads · 1099511627776 query blocks, more rows than a "
       "layout holds (4294967296)"},
      {"local layout over 2^63 - 1 tokens in blocks of 1",
       [&](W&) { (void)attn::BlockSparseLayout::local(kMax, 1, 1, 1); },
       "more rows than a layout holds"},
      {"random layout over 2^63 - 1 blocks",
       [&](W&) { (void)attn::BlockSparseLayout::random(kMax, 2, kBig, 7, 3); },
       "more rows than a layout holds"},
      {"longformer with 2 · block overflowing",
       [&](W&) {
         attn::LongformerConfig c;
         c.block = kBig;
         (void)attn::longformer(100, {}, c);
       },
       "longformer 2 · block: 2 · 4611686018427387904 overflows"},
      {"bigbird over 2^63 - 1 tokens",
       [&](W&) {
         attn::BigBirdConfig c;
         c.block = 1;
         c.global_blocks = kMax;
         (void)attn::bigbird(kMax, c);
       },
       "more rows than a layout holds"},
  });
}

// Huge counts that fit: the builders finish (no overflow, no endless sampling).
TEST(Hostile, BuildersWithHugeCountsFinish) {
  // per_row = 2^62 used to overflow 4 · per_row and sample forever
  const auto r = attn::BlockSparseLayout::random(64, 1, kBig, 3);
  EXPECT_EQ(r.nnz(), 64 * 64);
  attn::BigBirdConfig c;
  c.block = 1;
  c.global_blocks = kMax;  // every block global: (g + 1) / 2 used to overflow
  EXPECT_EQ(attn::bigbird(40, c).nnz(), 40 * 40);
  // ceil(seq_len / block) without seq_len + block - 1 overflowing
  EXPECT_EQ(attn::BlockSparseLayout::local(kMax, kMax, 1, -1).q_blocks(), 1);
  EXPECT_EQ(attn::BlockSparseLayout::local(kMax - 1, kBig, 0, 0).q_blocks(), 2);
  EXPECT_EQ(attn::alibi_slopes(3).size(), 3u);
}

// -------------------------------------------------------- 2. aliasing --

// Every wrapper policy lists the views of the policies inside it.
static_assert(attn::detail::has_views<attn::BlockSparseMask<attn::BoolMask>>::value,
              "block-sparse masks forward their inner mask's views");
static_assert(attn::detail::has_views<attn::MaskAnd<attn::Causal, attn::BoolMask>>::value,
              "a & b forwards both masks' views");
static_assert(
    attn::detail::has_views<attn::ComposedMod<attn::Softcap, attn::AdditiveBias<float>>>::value,
    "compose forwards every modifier's views");

TEST(Hostile, OutputsThatAliasWhatTheCallReads) {
  const auto layout = attn::BlockSparseLayout::local(W::Lq, 2, 1, 1);  // 3×3 blocks of 2
  const attn::BlockSparseLayout grid(2, 2, 3, 3, 1, layout.row_offsets(), layout.cols());
  // out spread over the mask bytes (the mask is 120 bools = 30 floats)
  auto out_on_mask = [](W& w) {
    return attn::bhsd(reinterpret_cast<float*>(w.mask_buf.get()), 1, 1, 2, 3);
  };
  auto lse_on_mask = [](W& w) {
    return TensorView<float, 3>(reinterpret_cast<float*>(w.mask_buf.get()), {W::B, W::Hq, W::Lq});
  };
  run_table({
      {"sparse_attention: out over a bool mask nested in the layout's mask",
       [&](W& w) {
         // a 1-batch, 1-head, Lq = 2, Dv = 3 problem whose out lies on the mask bytes
         const auto q = attn::bhsd(static_cast<const float*>(w.at(0)), 1, 1, 2, W::D);
         const auto k = attn::bhsd(static_cast<const float*>(w.at(W::q_n)), 1, 1, 2, W::D);
         const auto v = attn::bhsd(static_cast<const float*>(w.at(W::q_n + W::k_n)), 1, 1, 2, 3);
         const auto l1 = attn::BlockSparseLayout::local(2, 2, 0, 0);
         attn::sparse_attention(
             q, k, v, out_on_mask(w), l1,
             attn::bool_mask(attn::bhsd(static_cast<const bool*>(w.mask_buf.get()), 1, 1, 2, 2)));
       },
       "out overlaps bool_mask"},
      {"sparse_attention: lse over a bool mask nested under causal() &",
       [&](W& w) {
         attn::AttentionOptions o;
         o.lse = lse_on_mask(w);
         attn::sparse_attention(
             w.q(), w.k(), w.v(), w.out(),
             attn::BlockSparseLayout(2, 2, 3, 3, 1, layout.row_offsets(), layout.cols()),
             attn::causal() & attn::bool_mask(w.mask()), attn::no_score_mod(), o);
       },
       "lse overlaps bool_mask"},
      {"sparse_attention: out over an additive bias",
       [&](W& w) {
         attn::sparse_attention(
             w.q(), w.k(), w.v(), attn::bhsd(w.bias_p() + 7, W::B, W::Hq, W::Lq, W::Dv), grid,
             attn::no_mask(), attn::compose(attn::softcap(5.0), attn::additive_bias(w.bias())));
       },
       "out overlaps additive_bias"},
      {"masked_attention: a block-sparse mask (as a policy) around a bool mask",
       [&](W& w) {
         attn::BlockSparseMask<attn::BoolMask> m;
         m.layout = &grid;
         m.inner = attn::bool_mask(w.mask());
         attn::AttentionOptions o;
         o.lse = lse_on_mask(w);
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), m, o);
       },
       "lse overlaps bool_mask"},
      {"attention_weights: weights over the additive bias it reads",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(), attn::bhsd(w.bias_p(), W::B, W::Hq, W::Lq, W::Lk),
                                 attn::causal(), attn::additive_bias(w.bias()));
       },
       "weights overlaps additive_bias"},
      {"attention_weights: weights over a bool mask under &",
       [&](W& w) {
         attn::attention_weights(
             w.q(), w.k(),
             attn::bhsd(reinterpret_cast<float*>(w.mask_buf.get()), W::B, W::Hq, W::Lq, W::Lk),
             attn::causal() & attn::bool_mask(w.mask()));
       },
       "weights overlaps bool_mask"},
      {"attention_weights: weights over q",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(), attn::bhsd(w.at(3), W::B, W::Hq, W::Lq, W::Lk));
       },
       "weights overlaps q"},
      {"options.stats inside q",
       [&](W& w) {
         attn::AttentionOptions o;
         o.stats = reinterpret_cast<attn::AttentionStats*>(w.at(8));
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal(), o);
       },
       "stats overlaps q: stats spans bytes ["},
      {"options.stats inside v",
       [&](W& w) {
         attn::AttentionOptions o;
         o.stats = reinterpret_cast<attn::AttentionStats*>(w.at(W::q_n + W::k_n + 2));
         attn::scaled_dot_product_attention(w.q(), w.k(), w.v(), w.out(), o);
       },
       "stats overlaps v"},
      {"options.stats inside an additive bias (masked_attention)",
       [&](W& w) {
         attn::AttentionOptions o;
         o.stats = reinterpret_cast<attn::AttentionStats*>(w.bias_p() + 4);
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal(),
                                attn::compose(attn::softcap(4.0), attn::additive_bias(w.bias())),
                                o);
       },
       "stats overlaps additive_bias"},
      {"options.stats inside a bool mask nested in a block-sparse layout",
       [&](W& w) {
         attn::AttentionOptions o;
         o.stats = reinterpret_cast<attn::AttentionStats*>(w.mask_buf.get() + 8);
         attn::sparse_attention(w.q(), w.k(), w.v(), w.out(), grid,
                                attn::causal() & attn::bool_mask(w.mask()), attn::no_score_mod(),
                                o);
       },
       "stats overlaps bool_mask"},
      {"options.stats inside lse (sparse_attention)",
       [&](W& w) {
         attn::AttentionOptions o;
         o.lse = w.lse();
         o.stats = reinterpret_cast<attn::AttentionStats*>(o.lse.float_view().data());
         attn::sparse_attention(w.q(), w.k(), w.v(), w.out(), grid, o);
       },
       "stats overlaps lse"},
  });
}

// ------------------------------------------- 3. parameters in Acc --

TEST(Hostile, ParametersFiniteAsDoubleButInfiniteAsFloat) {
  const auto layout = attn::BlockSparseLayout::local(W::Lq, 2, 1, 1);
  const attn::BlockSparseLayout grid(2, 2, 3, 3, 1, layout.row_offsets(), layout.cols());
  attn::AttentionOptions big;
  big.scale = 1e39;
  run_table({
      {"scale 1e39, float (masked_attention)",
       [&](W& w) { attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal(), big); },
       "scale is 1e+39, must be finite in the accumulation type float (|scale| <= 3.40282e+38)"},
      {"scale 1e39, float (scaled_dot_product_attention)",
       [&](W& w) { attn::scaled_dot_product_attention(w.q(), w.k(), w.v(), w.out(), big); },
       "scale is 1e+39, must be finite in the accumulation type float"},
      {"scale 1e39, float (sparse_attention)",
       [&](W& w) { attn::sparse_attention(w.q(), w.k(), w.v(), w.out(), grid, big); },
       "scale is 1e+39, must be finite in the accumulation type float"},
      {"scale -1e39, float (attention_weights)",
       [&](W& w) {
         attn::AttentionOptions o;
         o.scale = -1e39;
         attn::attention_weights(w.q(), w.k(), w.weights(), attn::no_mask(), attn::no_score_mod(),
                                 o);
       },
       "scale is -1e+39, must be finite in the accumulation type float"},
      {"ALiBi slope 1e39, float",
       [&](W& w) {
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal(),
                                attn::alibi(std::vector<double>{0.5, 1e39}));
       },
       "alibi slope of head 1 is 1e+39, must be finite in the accumulation type float times the "
       "largest distance, Lq + Lk = 11"},
      {"ALiBi slope 1e38 times a distance of 11 overflows float",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(), w.weights(), attn::no_mask(),
                                 attn::alibi(std::vector<double>{-1e38, 0.5}));
       },
       "alibi slope of head 0 is -1e+38"},
      {"soft-cap 1e39, float",
       [&](W& w) {
         attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::no_mask(), attn::softcap(1e39));
       },
       "softcap cap is 1e+39, it and 1 / cap must be finite in the accumulation type float"},
      {"linear attention eps 1e39, float",
       [&](W& w) {
         attn::LinearAttentionOptions o;
         o.eps = 1e39;
         attn::linear_attention(w.q(), w.k(), w.v(), w.out(), attn::elu_plus_one(), o);
       },
       "eps is 1e+39, must be finite in the accumulation type float"},
      {"soft-cap 1e-39 (1 / cap infinite as float)",
       [&](W& w) {
         attn::attention_weights(w.q(), w.k(), w.weights(), attn::causal(), attn::softcap(1e-39));
       },
       "softcap cap is 1e-39, it and 1 / cap must be finite"},
  });
}

TEST(Hostile, ParametersFiniteInDoubleAreAccepted) {
  // The same values run in double: finite there, so accepted.
  std::vector<double> buf(4 * 64, 0.25);
  const auto q = attn::bhsd(static_cast<const double*>(buf.data()), 1, 2, 3, 4);
  const auto k = attn::bhsd(static_cast<const double*>(buf.data() + 24), 1, 2, 3, 4);
  const auto v = attn::bhsd(static_cast<const double*>(buf.data() + 48), 1, 2, 3, 4);
  const auto out = attn::bhsd(buf.data() + 96, 1, 2, 3, 4);
  attn::AttentionOptions o;
  o.scale = 1e39;
  EXPECT_NO_THROW(attn::masked_attention(q, k, v, out, attn::causal(), o));
  EXPECT_NO_THROW(attn::masked_attention(
      q, k, v, out, attn::causal(),
      attn::compose(attn::alibi(std::vector<double>{1e39, 1.0}), attn::softcap(1e39))));
  for (index_t i = 96; i < 120; ++i) EXPECT_TRUE(std::isfinite(buf[static_cast<std::size_t>(i)]));
}

// ----------------------------------------------------- 4. semantics --

TEST(Hostile, NonPositiveAlibiHeadCounts) {
  run_table({
      {"alibi_slopes(0)", [](W&) { (void)attn::alibi_slopes(0); },
       "alibi_slopes: the head count is 0, must be > 0"},
      {"alibi_slopes(-3)", [](W&) { (void)attn::alibi_slopes(-3); },
       "alibi_slopes: the head count is -3, must be > 0"},
      {"alibi_slopes(min)",
       [](W&) { (void)attn::alibi_slopes(std::numeric_limits<index_t>::min()); },
       "alibi_slopes: the head count is -9223372036854775808"},
      {"alibi_slopes(2^40): refused before 8 TiB are asked of the allocator",
       [](W&) { (void)attn::alibi_slopes(index_t{1} << 40); },
       "alibi_slopes: the head count is 1099511627776, more than the 16777216 attn supports"},
  });
  EXPECT_EQ(attn::alibi_slopes(index_t{1} << 24).size(), std::size_t{1} << 24);  // the limit itself
}

// A query row with a NaN is NaN in the weights exactly where the forward's
// output row is NaN; a NaN key the mask hides changes nothing in either.
TEST(Hostile, NanRowsAgreeBetweenWeightsAndForward) {
  for (int where : {0, 1}) {  // 0: NaN in query row 2 of head 1; 1: NaN in a masked key
    SCOPED_TRACE(where == 0 ? "NaN query" : "NaN in a key the mask hides");
    World w;
    if (where == 0)
      w.at(0)[(0 * W::Hq + 1) * W::Lq * W::D + 2 * W::D + 1] = std::nanf("");
    else  // key 5 of batch 0: causal (Lk - Lq = 1) hides it from query rows 0..3
      w.at(W::q_n)[5 * W::D] = std::nanf("");
    attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal());
    attn::attention_weights(w.q(), w.k(), w.weights(), attn::causal());
    for (index_t b = 0; b < W::B; ++b)
      for (index_t h = 0; h < W::Hq; ++h)
        for (index_t i = 0; i < W::Lq; ++i) {
          const bool out_nan = std::isnan(w.out()(b, h, i, 0));
          for (index_t c = 0; c < W::Dv; ++c) EXPECT_EQ(std::isnan(w.out()(b, h, i, c)), out_nan);
          double sum = 0;
          for (index_t j = 0; j < W::Lk; ++j) {
            EXPECT_EQ(std::isnan(w.weights()(b, h, i, j)), out_nan) << b << h << i << j;
            sum += w.weights()(b, h, i, j);
          }
          const bool expect_nan =
              where == 0 ? (b == 0 && h == 1 && i == 2) : (b == 0 && i == W::Lq - 1);
          EXPECT_EQ(out_nan, expect_nan) << b << h << i;
          if (!out_nan) {
            EXPECT_NEAR(sum, 1.0, 1e-5);
          }
        }
  }
}

// ---------------------------------------- 5. exceptions in callbacks --

struct Boom : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A feature map that throws on its third call.
struct ThrowingMap : attn::SimpleFeatureMap<ThrowingMap> {
  std::shared_ptr<std::atomic<int>> calls = std::make_shared<std::atomic<int>>(0);
  index_t num_features(index_t d) const { return d; }
  template <class Acc>
  void features(attn::FeatureInput<Acc> x, attn::FeatureOutput<Acc> phi) const {
    if (++*calls == 3) throw Boom("feature map");
    phi.array() = x.array().abs();
  }
};

TEST(Hostile, CallbackExceptionsReachTheCallerWithAnyThreadCount) {
  for (int threads : {1, 2, 4}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    World w;
    attn::AttentionOptions o;
    o.num_threads = threads;
    o.block_q = 2;
    const auto throws_at = [](index_t q) {
      return [q](index_t, index_t, index_t i, index_t) {
        if (i == q) throw Boom("mask");
        return true;
      };
    };
    auto expect_boom = [](const char* what, const std::function<void()>& call) {
      try {
        call();
        ADD_FAILURE() << "no exception";
      } catch (const Boom& e) {
        EXPECT_STREQ(e.what(), what);
      }
    };
    expect_boom("mask", [&] {
      attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::custom_mask(throws_at(3)), o);
    });
    expect_boom("score", [&] {
      attn::masked_attention(
          w.q(), w.k(), w.v(), w.out(), attn::causal(),
          attn::custom_score_mod([](index_t b, index_t, index_t, index_t, auto s) -> decltype(s) {
            if (b == 1) throw Boom("score");
            return s;
          }),
          o);
    });
    expect_boom("mask", [&] {
      attn::attention_weights(w.q(), w.k(), w.weights(), attn::custom_mask(throws_at(4)),
                              attn::no_score_mod(), o);
    });
    const auto layout = attn::BlockSparseLayout::local(W::Lq, 2, 1, 1);
    const attn::BlockSparseLayout grid(2, 2, 3, 3, 1, layout.row_offsets(), layout.cols());
    attn::AttentionOptions so = o;
    so.block_q = 0;
    expect_boom("mask", [&] {
      attn::sparse_attention(w.q(), w.k(), w.v(), w.out(), grid, attn::custom_mask(throws_at(0)),
                             attn::no_score_mod(), so);
    });
    attn::LinearAttentionOptions lo;
    lo.num_threads = threads;
    expect_boom("feature map",
                [&] { attn::linear_attention(w.q(), w.k(), w.v(), w.out(), ThrowingMap{}, lo); });
    // After an exception the next call works normally.
    EXPECT_NO_THROW(attn::masked_attention(w.q(), w.k(), w.v(), w.out(), attn::causal(), o));
  }
}

}  // namespace
