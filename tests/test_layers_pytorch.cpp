// Layers loaded as real models load them: PyTorch [out, in] weights and fused
// QKV equal the in_out form bit for bit, every weight form gives the same bits
// on 1, 2 and 3 threads, a square weight in the wrong declared layout is
// caught against the reference layer, layers live in std::vector, a Hugging
// Face padding mask [B, 1, 1, L] broadcasts over queries, and outputs that
// overlap an input are refused before anything is written.
#include "layer_reference.hpp"

#include <attn/cross.hpp>
#include <attn/multi_head.hpp>

#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace attn_test;
using attn::WeightLayout;

template <class T>
class LayersPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(LayersPyTorch, FloatTypes, );

attn::MultiHeadConfig config(index_t d_model, index_t hq, index_t hkv) {
  attn::MultiHeadConfig c;
  c.d_model = d_model;
  c.q_heads = hq;
  c.kv_heads = hkv;
  return attn::detail::resolve_config(c);
}

template <class T>
std::vector<MatD> batches(const Sequence<T>& s) {
  std::vector<MatD> r;
  for (index_t b = 0; b < s.B; ++b) r.push_back(s.batch(b));
  return r;
}

/// The weights of LayerWeights in every form a caller may hold them.
template <class T>
struct Forms {
  using Row = attn::RowMatrix<T>;
  Row wq, wk, wv, wo;  // [in, out]
  Row tq, tk, tv, to;  // PyTorch [out, in]
  Row qkv;             // fused PyTorch [(nq + nk + nv), d_model]
  Eigen::Matrix<T, -1, 1> bq, bk, bv, bo, bqkv;
  explicit Forms(const LayerWeights<T>& w)
      : wq(w.wq.template cast<T>()), wk(w.wk.template cast<T>()), wv(w.wv.template cast<T>()),
        wo(w.wo.template cast<T>()) {
    tq = wq.transpose();
    tk = wk.transpose();
    tv = wv.transpose();
    to = wo.transpose();
    if (tk.cols() == tq.cols()) {  // fused only when q, k, v read the same input (self-attention)
      qkv.resize(tq.rows() + tk.rows() + tv.rows(), tq.cols());
      qkv << tq, tk, tv;
    }
    bq = w.bq.template cast<T>();
    bk = w.bk.template cast<T>();
    bv = w.bv.template cast<T>();
    bo = w.bo.template cast<T>();
    bqkv.resize(bq.size() + bk.size() + bv.size());
    bqkv << bq, bk, bv;
  }
  static attn::TensorView<const T, 2> view(const Row& m) {
    return attn::TensorView<const T, 2>(m.data(), {m.rows(), m.cols()});
  }
  static attn::TensorView<const T, 1> vec(const Eigen::Matrix<T, -1, 1>& v) {
    return attn::TensorView<const T, 1>(v.data(), {v.size()});
  }
  /// Free-function weights in PyTorch layout, separate or fused.
  attn::MultiHeadWeights<T> pytorch(bool fused) const {
    attn::MultiHeadWeights<T> m;
    m.layout = WeightLayout::out_in;
    if (fused) {
      m.wqkv = view(qkv);
      m.bqkv = vec(bqkv);
    } else {
      m.wq = view(tq);
      m.wk = view(tk);
      m.wv = view(tv);
      m.bq = vec(bq);
      m.bk = vec(bk);
      m.bv = vec(bv);
    }
    m.wo = view(to);
    m.bo = vec(bo);
    return m;
  }
  /// PyTorch buffers viewed in place as [in, out] (strides {1, in}), layout in_out.
  attn::MultiHeadWeights<T> pytorch_viewed_in_out() const {
    attn::MultiHeadWeights<T> m;
    auto tv_ = [](const Row& t) {
      return attn::TensorView<const T, 2>(t.data(), {t.cols(), t.rows()}, {1, t.cols()});
    };
    m.wq = tv_(tq);
    m.wk = tv_(tk);
    m.wv = tv_(tv);
    m.wo = tv_(to);
    m.bq = vec(bq);
    m.bk = vec(bk);
    m.bv = vec(bv);
    m.bo = vec(bo);
    return m;
  }
  void load_pytorch(attn::MultiHeadAttention<T>& l, bool fused) const {
    if (fused) {
      l.set_wqkv(qkv.data(), qkv.rows(), qkv.cols(), WeightLayout::out_in);
      l.set_bqkv(bqkv.data(), bqkv.size());
    } else {
      l.set_wq(tq.data(), tq.rows(), tq.cols(), WeightLayout::out_in);
      l.set_wk(view(tk), WeightLayout::out_in);
      l.set_wv(tv, WeightLayout::out_in);
      l.set_bq(bq);
      l.set_bk(bk);
      l.set_bv(bv);
    }
    l.set_wo(to.data(), to.rows(), to.cols(), WeightLayout::out_in);
    l.set_bo(bo);
  }
};

// Every form of the same weights, through the layer and the free function,
// on 1, 2 and 3 threads and at row counts on both sides of the parallel
// thresholds, gives the bits of the in_out layer on one thread.
TYPED_TEST(LayersPyTorch, EveryWeightFormAndThreadCountGivesTheSameBits) {
  using T = TypeParam;
  const attn::MultiHeadConfig c = config(48, 6, 2);
  const LayerWeights<T> w(c, true, 21);
  const Forms<T> f(w);
  attn::MultiHeadAttention<T> base(c), pt(c), fused(c);
  w.load(base);
  f.load_pytorch(pt, false);
  f.load_pytorch(fused, true);
  for (index_t L : {1, 37, 300}) {
    const Sequence<T> x = random_sequence<T>(2, L, c.d_model, static_cast<std::uint32_t>(L));
    Sequence<T> want(2, L, c.d_model);
    attn::AttentionOptions one;
    one.num_threads = 1;
    base.forward(x.cview(), want.view(), attn::causal(), one);
    const auto ref = reference_layer(c, w, batches(x), batches(x),
                                     [](index_t, index_t, index_t i, index_t j) { return j <= i; });
    EXPECT_LE(max_layer_diff(want, ref.out), layer_tolerance<T>(c, L));
    for (int threads : {1, 2, 3}) {
      attn::AttentionOptions opt;
      opt.num_threads = threads;
      std::vector<std::pair<std::string, Sequence<T>>> got;
      auto run = [&](const std::string& name, auto&& call) {
        Sequence<T> out(2, L, c.d_model);
        call(out);
        got.emplace_back(name, out);
      };
      run("in_out layer",
          [&](Sequence<T>& o) { base.forward(x.cview(), o.view(), attn::causal(), opt); });
      run("out_in layer",
          [&](Sequence<T>& o) { pt.forward(x.cview(), o.view(), attn::causal(), opt); });
      run("fused out_in layer",
          [&](Sequence<T>& o) { fused.forward(x.cview(), o.view(), attn::causal(), opt); });
      run("out_in free", [&](Sequence<T>& o) {
        attn::multi_head_attention<T>(x.cview(), o.view(), c, f.pytorch(false), attn::causal(),
                                      attn::no_score_mod(), opt);
      });
      run("fused out_in free", [&](Sequence<T>& o) {
        attn::multi_head_attention<T>(x.cview(), o.view(), c, f.pytorch(true), attn::causal(),
                                      attn::no_score_mod(), opt);
      });
      run("strided in_out free", [&](Sequence<T>& o) {
        attn::multi_head_attention<T>(x.cview(), o.view(), c, f.pytorch_viewed_in_out(),
                                      attn::causal(), attn::no_score_mod(), opt);
      });
      for (const auto& [name, out] : got)
        EXPECT_EQ(out.buf, want.buf) << name << " threads=" << threads << " L=" << L;
    }
  }
}

// Cross attention with PyTorch-layout weights equals the in_out layer bitwise.
TYPED_TEST(LayersPyTorch, CrossAttentionTakesPyTorchWeights) {
  using T = TypeParam;
  attn::MultiHeadConfig c = config(32, 4, 2);
  c.d_kv_in = 24;
  const LayerWeights<T> w(c, true, 4);
  const Forms<T> f(w);
  attn::CrossAttention<T> a(c), b(c);
  w.load(a);
  b.set_wq(f.tq, WeightLayout::out_in);
  b.set_wk(f.tk, WeightLayout::out_in);
  b.set_wv(f.tv, WeightLayout::out_in);
  b.set_wo(f.to, WeightLayout::out_in);
  b.set_bq(f.bq);
  b.set_bk(f.bk);
  b.set_bv(f.bv);
  b.set_bo(f.bo);
  const Sequence<T> x = random_sequence<T>(2, 9, 32, 1), m = random_sequence<T>(2, 13, 24, 2);
  Sequence<T> oa(2, 9, 32), ob(2, 9, 32), of(2, 9, 32);
  a.forward(x.cview(), m.cview(), oa.view());
  b.forward(x.cview(), m.cview(), ob.view());
  attn::cross_attention<T>(x.cview(), m.cview(), of.view(), c, f.pytorch(false));
  EXPECT_EQ(oa.buf, ob.buf);
  EXPECT_EQ(oa.buf, of.buf);
}

// BERT's weights are square: a checkpoint's [out, in] buffer declared in_out
// passes every shape check. The output then differs from the reference layer
// far beyond its tolerance; declared out_in it agrees.
TYPED_TEST(LayersPyTorch, SquareWeightInTheWrongLayoutIsCaughtByTheReference) {
  using T = TypeParam;
  const attn::MultiHeadConfig c = config(32, 4, 4);
  const LayerWeights<T> w(c, true, 8);
  const Forms<T> f(w);
  const Sequence<T> x = random_sequence<T>(2, 10, 32, 3);
  const auto ref = reference_layer(c, w, batches(x), batches(x)).out;
  for (WeightLayout declared : {WeightLayout::out_in, WeightLayout::in_out}) {
    attn::MultiHeadAttention<T> l(c);
    l.set_wq(f.tq.data(), 32, 32, declared);
    l.set_wk(f.tk.data(), 32, 32, declared);
    l.set_wv(f.tv.data(), 32, 32, declared);
    l.set_wo(f.to.data(), 32, 32, declared);
    l.set_bq(f.bq);
    l.set_bk(f.bk);
    l.set_bv(f.bv);
    l.set_bo(f.bo);
    Sequence<T> out(2, 10, 32);
    l.forward(x.cview(), out.view());
    const double diff = max_layer_diff(out, ref);
    if (declared == WeightLayout::out_in)
      EXPECT_LE(diff, layer_tolerance<T>(c, 10));
    else
      EXPECT_GT(diff, 1000 * layer_tolerance<T>(c, 10)) << "the wrong layout went unnoticed";
  }
}

// Layers are nothrow-movable and truly copyable: they live in a vector, and
// a copy computes the same bits and owns its weights.
TYPED_TEST(LayersPyTorch, LayersLiveInAVector) {
  using T = TypeParam;
  static_assert(std::is_nothrow_move_constructible<attn::MultiHeadAttention<T>>::value, "");
  static_assert(std::is_nothrow_move_assignable<attn::MultiHeadAttention<T>>::value, "");
  static_assert(std::is_nothrow_move_constructible<attn::CrossAttention<T>>::value, "");
  static_assert(std::is_copy_constructible<attn::MultiHeadAttention<T>>::value, "");
  const attn::MultiHeadConfig c = config(16, 2, 1);
  std::vector<attn::MultiHeadAttention<T>> layers;
  for (std::uint32_t i = 0; i < 5; ++i) {
    layers.emplace_back(c);
    LayerWeights<T>(c, true, 30 + i).load(layers.back());
  }
  const Sequence<T> x = random_sequence<T>(1, 7, 16, 1);
  std::vector<Sequence<T>> outs;
  for (auto& l : layers) {
    outs.emplace_back(1, 7, 16);
    l.forward(x.cview(), outs.back().view());
  }
  attn::MultiHeadAttention<T> copy = layers[2];
  Sequence<T> oc(1, 7, 16);
  copy.forward(x.cview(), oc.view());
  EXPECT_EQ(oc.buf, outs[2].buf);
  copy.set_wq(attn::RowMatrix<T>::Zero(16, 16));
  Sequence<T> o2(1, 7, 16);
  layers[2].forward(x.cview(), o2.view());
  EXPECT_EQ(o2.buf, outs[2].buf) << "changing a copy changed the original";
  const auto ref = reference_layer(c, LayerWeights<T>(c, true, 32), batches(x), batches(x)).out;
  EXPECT_LE(max_layer_diff(outs[2], ref), layer_tolerance<T>(c, 7));
}

// A Hugging Face padding mask [B, 1, 1, L] (and an additive [1, 1, 1, L]
// bias) broadcast over queries: the same bits as key_padding / the full bias.
TYPED_TEST(LayersPyTorch, PaddingMaskBroadcastsOverQueries) {
  using T = TypeParam;
  const attn::MultiHeadConfig c = config(24, 3, 3);
  const LayerWeights<T> w(c, true, 5);
  attn::MultiHeadAttention<T> l(c);
  w.load(l);
  const index_t B = 2, L = 19;
  const std::vector<index_t> lengths{19, 6};
  std::unique_ptr<bool[]> hf(new bool[B * L]);
  for (index_t b = 0; b < B; ++b)
    for (index_t j = 0; j < L; ++j) hf[b * L + j] = j < lengths[static_cast<std::size_t>(b)];
  std::unique_ptr<bool[]> expanded(new bool[B * L * L]);  // [B, 1, L, L]
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < L; ++j) expanded[(b * L + i) * L + j] = hf[b * L + j];
  const attn::TensorView<const bool, 4> hf_view(hf.get(), {B, 1, 1, L});
  const Sequence<T> x = random_sequence<T>(B, L, 24, 2);
  Sequence<T> a(B, L, 24), b(B, L, 24), k(B, L, 24);
  l.forward(x.cview(), a.view(),
            attn::bool_mask(attn::TensorView<const bool, 4>(expanded.get(), {B, 1, L, L})));
  l.forward(x.cview(), b.view(), attn::bool_mask(hf_view));
  EXPECT_EQ(a.buf, b.buf);
  l.forward(x.cview(), k.view(), attn::key_padding(lengths));  // other key ranges: within rounding
  const KeepFn keep = [&](index_t bb, index_t, index_t, index_t j) {
    return j < lengths[static_cast<std::size_t>(bb)];
  };
  EXPECT_LE(max_layer_diff(b, reference_layer(c, w, batches(x), batches(x), keep).out),
            layer_tolerance<T>(c, L));
  EXPECT_LE(max_layer_diff(k, batches(b)), layer_tolerance<T>(c, L));
  std::vector<float> row(static_cast<std::size_t>(L)), full(static_cast<std::size_t>(3 * L * L));
  for (index_t j = 0; j < L; ++j) row[static_cast<std::size_t>(j)] = 0.25f * float(j % 5) - 0.5f;
  for (index_t h = 0; h < 3; ++h)
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < L; ++j)
        full[static_cast<std::size_t>((h * L + i) * L + j)] = row[static_cast<std::size_t>(j)];
  Sequence<T> d(B, L, 24), e(B, L, 24);
  l.forward(x.cview(), d.view(), attn::NoMask{},
            attn::additive_bias(attn::TensorView<const float, 4>(row.data(), {1, 1, 1, L})));
  l.forward(x.cview(), e.view(), attn::NoMask{},
            attn::additive_bias(attn::TensorView<const float, 4>(full.data(), {1, 3, L, L})));
  EXPECT_EQ(d.buf, e.buf);
}

// Outputs (out, options.lse) that overlap x, a weight, a bias or each other
// are refused with a message naming both, and nothing is written.
TEST(LayersOverlap, OutputsOverlappingAnyInputAreRefused) {
  const attn::MultiHeadConfig c = config(16, 2, 2);
  const LayerWeights<float> w(c, true, 3);
  attn::MultiHeadAttention<float> l(c);
  w.load(l);
  const index_t B = 2, L = 8;
  Sequence<float> x = random_sequence<float>(B, L, 16, 1);
  Sequence<float> out(B, L, 16);
  std::vector<float> lse_buf(static_cast<std::size_t>(B * 2 * L), 7.f);
  const std::vector<float> x_before = x.buf;
  auto lse_on = [&](float* p) {
    attn::AttentionOptions o;
    o.lse = attn::TensorView<float, 3>(p, {B, 2, L});
    return o;
  };
  EXPECT_TRUE(
      throws_with([&] { l.forward(x.cview(), out.view(), attn::NoMask{}, lse_on(x.buf.data())); },
                  "options.lse overlaps x"));
  EXPECT_TRUE(
      throws_with([&] { l.forward(x.cview(), out.view(), attn::NoMask{}, lse_on(out.buf.data())); },
                  "overlaps out"));
  EXPECT_EQ(x.buf, x_before);
  // The free function: out on a weight, lse on a bias.
  attn::RowMatrix<float> wq = w.wq.cast<float>(), wk = w.wk.cast<float>(), wv = w.wv.cast<float>(),
                         wo = w.wo.cast<float>();
  Eigen::VectorXf bo = w.bo.cast<float>();
  attn::MultiHeadWeights<float> mw;
  mw.wq = attn::TensorView<const float, 2>(wq.data(), {16, 16});
  mw.wk = attn::TensorView<const float, 2>(wk.data(), {16, 16});
  mw.wv = attn::TensorView<const float, 2>(wv.data(), {16, 16});
  mw.wo = attn::TensorView<const float, 2>(wo.data(), {16, 16});
  mw.bo = attn::TensorView<const float, 1>(bo.data(), {16});
  const attn::RowMatrix<float> wq_before = wq;
  EXPECT_TRUE(throws_with(
      [&] {
        attn::multi_head_attention<float>(x.cview(),
                                          attn::TensorView<float, 3>(wq.data(), {2, 8, 16}), c, mw);
      },
      "out overlaps Wq"));
  std::vector<float> big(16 + 2 * 2 * 8);
  Eigen::Map<Eigen::VectorXf>(big.data(), 16) = bo;
  mw.bo = attn::TensorView<const float, 1>(big.data(), {16});
  attn::AttentionOptions o = lse_on(big.data() + 8);
  EXPECT_TRUE(throws_with(
      [&] {
        attn::multi_head_attention<float>(x.cview(), out.view(), c, mw, attn::NoMask{},
                                          attn::NoScoreMod{}, o);
      },
      "options.lse overlaps bo"));
  EXPECT_EQ(wq, wq_before);
  EXPECT_EQ(bo, Eigen::Map<Eigen::VectorXf>(big.data(), 16));
  // Fused and separate weights at once is ambiguous.
  mw.wqkv = mw.wq;
  EXPECT_TRUE(throws_with([&] { attn::multi_head_attention<float>(x.cview(), out.view(), c, mw); },
                          "give one form"));
}

}  // namespace

namespace {

// Packed variable-length sequences equal the padded batch on the real rows
// (the padded batch under key padding, or causal & key padding), and the
// packed lse equals the padded one; RoPE restarts per sequence.
TYPED_TEST(LayersPyTorch, VarlenEqualsThePaddedBatchOnRealRows) {
  using T = TypeParam;
  attn::MultiHeadConfig c = config(24, 4, 2);
  c.rope = attn::Rope{};
  const LayerWeights<T> w(c, true, 12);
  attn::MultiHeadAttention<T> l(c);
  w.load(l);
  const std::vector<index_t> lengths{5, 0, 13, 1, 9};
  const index_t B = static_cast<index_t>(lengths.size()), L = 13;
  std::vector<index_t> cu{0};
  for (index_t n : lengths) cu.push_back(cu.back() + n);
  const index_t total = cu.back();
  const Sequence<T> padded = random_sequence<T>(B, L, 24, 4);
  std::vector<T> packed(static_cast<std::size_t>(total * 24)), out(packed.size());
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < lengths[static_cast<std::size_t>(b)]; ++t)
      for (index_t j = 0; j < 24; ++j)
        packed[static_cast<std::size_t>((cu[static_cast<std::size_t>(b)] + t) * 24 + j)] =
            padded.buf[static_cast<std::size_t>((b * L + t) * 24 + j)];
  for (bool causal : {false, true}) {
    Sequence<T> ref(B, L, 24);
    std::vector<float> lse_pad(static_cast<std::size_t>(B * 4 * L)),
        lse_packed(static_cast<std::size_t>(4 * total));
    attn::AttentionOptions op, ov;
    op.lse = attn::TensorView<float, 3>(lse_pad.data(), {B, 4, L});
    ov.lse = attn::TensorView<float, 3>(lse_packed.data(), {1, 4, total});
    if (causal) {
      l.forward(padded.cview(), ref.view(), attn::causal() & attn::key_padding(lengths), op);
      l.forward_varlen(attn::TensorView<const T, 2>(packed.data(), {total, 24}), cu,
                       attn::TensorView<T, 2>(out.data(), {total, 24}), attn::causal(), ov);
    } else {
      l.forward(padded.cview(), ref.view(), attn::key_padding(lengths), op);
      l.forward_varlen(attn::TensorView<const T, 2>(packed.data(), {total, 24}), cu,
                       attn::TensorView<T, 2>(out.data(), {total, 24}), attn::no_mask(), ov);
    }
    const double tol = layer_tolerance<T>(c, L);
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < lengths[static_cast<std::size_t>(b)]; ++t) {
        const index_t r = cu[static_cast<std::size_t>(b)] + t;
        for (index_t j = 0; j < 24; ++j)
          ASSERT_NEAR(double(out[static_cast<std::size_t>(r * 24 + j)]),
                      double(ref.buf[static_cast<std::size_t>((b * L + t) * 24 + j)]), tol)
              << "causal=" << causal << " b=" << b << " t=" << t;
        for (index_t h = 0; h < 4; ++h)
          ASSERT_NEAR(lse_packed[static_cast<std::size_t>(h * total + r)],
                      lse_pad[static_cast<std::size_t>((b * 4 + h) * L + t)], 1e-5);
      }
  }
  // Bad cu_seqlens are refused before anything is written.
  const std::vector<T> before = out;
  EXPECT_TRUE(throws_with(
      [&] {
        l.forward_varlen(attn::TensorView<const T, 2>(packed.data(), {total, 24}),
                         std::vector<index_t>{0, 5, 3, total},
                         attn::TensorView<T, 2>(out.data(), {total, 24}));
      },
      "cu_seqlens decreases at 2: 5 then 3"));
  EXPECT_TRUE(throws_with(
      [&] {
        l.forward_varlen(attn::TensorView<const T, 2>(packed.data(), {total, 24}),
                         std::vector<index_t>{0, total - 1},
                         attn::TensorView<T, 2>(out.data(), {total, 24}));
      },
      "cu_seqlens ends at"));
  EXPECT_EQ(out, before);
}

}  // namespace
