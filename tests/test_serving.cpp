// Tests of the serving paths: decoding (split-KV, GQA groups stacked) against
// the fp64 reference and the last rows of full attention; caches (contiguous,
// paged, int8, bf16); paged against contiguous bit for bit; varlen against one
// call per sequence; sinks against a reference with the extra logit; the
// StreamingLLM mask; determinism over thread counts; misuse.
#include "support.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn_test::expect_close;
using attn_test::Inputs;
using attn_test::Layout;
using attn_test::make;
using attn_test::max_abs;
using attn_test::max_abs_diff;
using attn_test::Problem;
using attn_test::random_tensor;
using attn_test::reference_output;
using attn_test::Tensor;
using attn_test::tolerance;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const attn::Error& e) {
    return e.what();
  }
  return "(no error)";
}

/// Rows [r0, r0 + n) of a [B, H, L, D] tensor, as a bhsd tensor.
template <class T>
Tensor<T> rows_of(const Tensor<T>& t, index_t r0, index_t n) {
  Tensor<T> r(t.extent(0), t.extent(1), n, t.extent(3));
  for (index_t b = 0; b < t.extent(0); ++b)
    for (index_t h = 0; h < t.extent(1); ++h)
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < t.extent(3); ++c) r(b, h, i, c) = t(b, h, r0 + i, c);
  return r;
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return a.buf.size() == b.buf.size() &&
         std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(T)) == 0;
}

// ----------------------------------------------------------------- decode --

// masked_attention with a few query rows takes the split-KV schedule; it must
// match the fp64 reference (lse included) for every mask and GQA shape.
TEST(Decode, SplitKVMatchesReference) {
  for (const Problem& p :
       {make(1, 8, 2, 1, 2100, 64, 64), make(2, 4, 1, 3, 1300, 59, 33, Layout::bshd),
        make(1, 6, 6, 1, 1025, 80, 80), make(1, 4, 2, 2, 257, 16, 16), make(3, 2, 2, 1, 1, 8, 8)}) {
    attn_test::expect_matches_reference<float>(p, attn::causal());
    attn_test::expect_matches_reference<float>(p, attn::no_mask(),
                                               attn::alibi(attn::alibi_slopes(p.Hq)));
    attn_test::expect_matches_reference<float>(p, attn::window(700, 0));
    attn_test::expect_matches_reference<double>(
        p,
        attn::causal() & attn::key_padding(std::vector<index_t>(
                             static_cast<std::size_t>(p.B), p.Lk - 100 > 0 ? p.Lk - 100 : p.Lk)));
  }
}

// Decoding steps read K and V as rows in place; a view whose rows are all one row
// (sequence stride 0, a broadcast) has a row stride of 0, which must still be
// read as rows (a fuzz input found it taken for packed panels).
TEST(Decode, BroadcastKeyAndValueRowsMatchReference) {
  const index_t Hq = 2, Hkv = 1, Lk = 40;
  for (index_t lq : {1, 3})
    for (index_t d : {1, 5, 16}) {
      SCOPED_TRACE("lq=" + std::to_string(lq) + " d=" + std::to_string(d));
      const auto q = random_tensor<float>(1, Hq, lq, d, 70);
      const auto one_k = random_tensor<float>(1, Hkv, 1, d, 71);
      const auto one_v = random_tensor<float>(1, Hkv, 1, d, 72);
      // [1, Hkv, Lk, d] views of a single row: stride 0 along the sequence.
      const attn::TensorView<const float, 4> k(one_k.buf.data(), {1, Hkv, Lk, d}, {d, d, 0, 1});
      const attn::TensorView<const float, 4> v(one_v.buf.data(), {1, Hkv, Lk, d}, {d, d, 0, 1});
      Tensor<float> out(1, Hq, lq, d);
      Tensor<double> ref(1, Hq, lq, d);
      attn::masked_attention(q.cview(), k, v, out.view, attn::causal());
      attn::reference::attention(q.cview(), k, v, ref.view, attn::causal());
      // Every key is the same row, so every output row is that value row.
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < lq; ++i)
          for (index_t c = 0; c < d; ++c) {
            EXPECT_NEAR(out(0, h, i, c), ref(0, h, i, c), tolerance<float>(d, Lk));
            EXPECT_NEAR(ref(0, h, i, c), one_v(0, 0, 0, c), 1e-6);
          }
    }
}

TEST(Decode, BitwiseForAnyThreadCount) {
  const Problem p = make(2, 8, 2, 1, 5000, 64, 64);
  const Inputs<float> in(p, 3);
  Tensor<float> first;
  for (int threads : {1, 2, 3, 5}) {
    Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
    attn::AttentionOptions opt;
    opt.num_threads = threads;
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), opt);
    if (threads == 1)
      first = out;
    else
      EXPECT_TRUE(bitwise_equal(first, out)) << threads << " threads";
  }
}

// The decode step of a cache equals the last rows of full (causal, ALiBi,
// windowed) attention over the whole sequence.
TEST(Decode, CacheEqualsLastRowsOfFullAttention) {
  const index_t B = 2, Hq = 8, Hkv = 2, L = 1100, D = 64, Dv = 48, new_rows = 3;
  const auto q = random_tensor<float>(B, Hq, L, D, 11);
  const auto k = random_tensor<float>(B, Hkv, L, D, 12);
  const auto v = random_tensor<float>(B, Hkv, L, Dv, 13);
  attn::KVCache<float> cache(B, Hkv, 2000, D, Dv);
  // Prefill L - new_rows tokens, then the new ones.
  cache.append(rows_of(k, 0, L - new_rows).cview(), rows_of(v, 0, L - new_rows).cview());
  cache.append(rows_of(k, L - new_rows, new_rows).cview(),
               rows_of(v, L - new_rows, new_rows).cview());
  const auto q_new = rows_of(q, L - new_rows, new_rows);
  auto check = [&](const auto& mask, const auto& mod, bool with_engine) {
    // The last rows of full attention: bottom-right aligned policies give the
    // same rows for q_new against all keys (the reference of those rows alone).
    Tensor<double> last(B, Hq, new_rows, Dv);
    const auto qd = attn_test::to_double(q_new), kd = attn_test::to_double(k),
               vd = attn_test::to_double(v);
    attn::reference::attention(qd.cview(), kd.cview(), vd.cview(), last.view, mask, mod);
    Tensor<float> out(B, Hq, new_rows, Dv);
    attn::cache_attention(q_new.cview(), cache, out.view, mask, mod);
    EXPECT_LE(max_abs_diff(out, last), tolerance<float>(D, L, max_abs(v)));
    if (!with_engine) return;
    // and the engine's own full forward, last rows (one row at a time is the decode loop)
    Tensor<float> full(B, Hq, L, Dv);
    attn::masked_attention(q.cview(), k.cview(), v.cview(), full.view, mask, mod);
    EXPECT_LE(max_abs_diff(out, rows_of(full, L - new_rows, new_rows)),
              2 * tolerance<float>(D, L, max_abs(v)));
  };
  check(attn::causal(), attn::no_score_mod(), true);
  check(attn::causal(), attn::alibi(attn::alibi_slopes(Hq)), false);
  check(attn::window(300, 0), attn::softcap(20.0), false);
}

// ------------------------------------------------------------------ paged --

template <class T>
void paged_equals_contiguous(index_t lq) {
  SCOPED_TRACE(std::string("Lq = ") + std::to_string(lq));
  const index_t Hq = 8, Hkv = 2, D = 40, Dv = 24, prefix = 300;
  const std::vector<index_t> lens = {1300, 37, 600};
  const index_t n = static_cast<index_t>(lens.size());
  attn::KVCache<T> flat(n, Hkv, 1400, D, Dv);
  attn::PagedKVCache<T> paged(200, 16, Hkv, D, Dv);
  // Sequence 2 shares the first `prefix` tokens of sequence 0 (a fork in the
  // paged cache, a copy in the contiguous one), then has its own.
  const auto k0 = random_tensor<float>(1, Hkv, lens[0], D, 20);
  const auto v0 = random_tensor<float>(1, Hkv, lens[0], Dv, 30);
  const auto k1 = random_tensor<float>(1, Hkv, lens[1], D, 21);
  const auto v1 = random_tensor<float>(1, Hkv, lens[1], Dv, 31);
  const auto k2 = random_tensor<float>(1, Hkv, lens[2] - prefix, D, 22);
  const auto v2 = random_tensor<float>(1, Hkv, lens[2] - prefix, Dv, 32);
  flat.append(0, k0.cview(), v0.cview());
  flat.append(1, k1.cview(), v1.cview());
  flat.append(2, rows_of(k0, 0, prefix).cview(), rows_of(v0, 0, prefix).cview());
  flat.append(2, k2.cview(), v2.cview());
  // Paged: odd chunk sizes, so blocks fill unevenly.
  auto append_chunks = [&](index_t seq, const Tensor<float>& k, const Tensor<float>& v,
                           index_t from, index_t to) {
    for (index_t t = from; t < to;) {
      const index_t c = std::min<index_t>(to - t, 7 + (13 * t) % 50);
      paged.append(seq, rows_of(k, t, c).cview(), rows_of(v, t, c).cview());
      t += c;
    }
  };
  const index_t p0 = paged.add_sequence(), p1 = paged.add_sequence();
  append_chunks(p0, k0, v0, 0, prefix);
  const index_t p2 = paged.fork(p0);
  append_chunks(p0, k0, v0, prefix, lens[0]);
  append_chunks(p1, k1, v1, 0, lens[1]);
  append_chunks(p2, k2, v2, 0, lens[2] - prefix);
  const std::vector<index_t> ids = {p0, p1, p2};
  const auto q = random_tensor<float>(n, Hq, lq, D, 40);
  const std::vector<index_t> flat_ids = {0, 1, 2};
  // One thread: the paged decode walks both KV groups of sequence 0's key
  // splits tile by tile in one task (segments.hpp, `fuse`); two: one group per task.
  for (int variant = 0; variant < 4; ++variant) {
    SCOPED_TRACE(std::string("threads ") + std::to_string(1 + variant / 2));
    Tensor<float> a(n, Hq, lq, Dv), b(n, Hq, lq, Dv);
    std::vector<float> la(static_cast<std::size_t>(n * Hq * lq)), lb(la.size());
    attn::AttentionOptions opt;
    opt.num_threads = 1 + variant / 2;
    opt.lse = attn::TensorView<float, 3>(la.data(), {n, Hq, lq});
    if (variant % 2 == 0) {
      attn::cache_attention(q.cview(), flat, flat_ids, a.view, attn::causal(), attn::no_score_mod(),
                            opt);
      opt.lse = attn::TensorView<float, 3>(lb.data(), {n, Hq, lq});
      attn::paged_attention(q.cview(), paged, ids, b.view, attn::causal(), attn::no_score_mod(),
                            opt);
    } else {
      const auto mask = attn::streaming(4, 100);
      const auto mod = attn::alibi(attn::alibi_slopes(Hq));
      attn::cache_attention(q.cview(), flat, flat_ids, a.view, mask, mod, opt);
      opt.lse = attn::TensorView<float, 3>(lb.data(), {n, Hq, lq});
      attn::paged_attention(q.cview(), paged, ids, b.view, mask, mod, opt);
    }
    EXPECT_TRUE(bitwise_equal(a, b))
        << "variant " << variant << ", max diff " << max_abs_diff(a, b);
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * sizeof(float)), 0);
  }
}

TEST(Paged, BitwiseEqualToContiguousCache) {
  paged_equals_contiguous<float>(1);   // decode: stacked groups, split keys
  paged_equals_contiguous<float>(20);  // chunked prefill: G·Lq > 64, one head per tile
  paged_equals_contiguous<std::int8_t>(1);
  paged_equals_contiguous<Eigen::bfloat16>(2);
}

// ------------------------------------------------------------- 8/16-bit KV --

// int8 K/V with a scale per (token, head): each element is off by at most
// s/2 = max|x_row|/254. A score then moves by at most
//   Δ = scale · ‖q‖₁ · max_j max|k_j| / 254,
// which moves each probability by a factor within e^{±2Δ}, so
//   |out_int8 − out| ≤ (e^{2Δ} − 1)·max|v| + max|v| / 254   (+ float rounding).
TEST(Int8Cache, WithinDerivedBound) {
  const index_t Hq = 8, Hkv = 2, L = 2000, D = 64;
  const auto q = random_tensor<float>(1, Hq, 1, D, 50);
  const auto k = random_tensor<float>(1, Hkv, L, D, 51);
  const auto v = random_tensor<float>(1, Hkv, L, D, 52);
  attn::KVCache<float> f32(1, Hkv, L, D);
  attn::KVCache<std::int8_t> i8(1, Hkv, L, D);
  attn::KVCache<Eigen::bfloat16> b16(1, Hkv, L, D);
  f32.append(k.cview(), v.cview());
  i8.append(k.cview(), v.cview());
  b16.append(k.cview(), v.cview());
  Tensor<float> o32(1, Hq, 1, D), o8(1, Hq, 1, D), o16(1, Hq, 1, D);
  attn::cache_attention(q.cview(), f32, o32.view, attn::causal());
  attn::cache_attention(q.cview(), i8, o8.view, attn::causal());
  attn::cache_attention(q.cview(), b16, o16.view, attn::causal());
  const double scale = 1.0 / std::sqrt(double(D)), kmax = max_abs(k), vmax = max_abs(v);
  double worst = 0;
  for (index_t h = 0; h < Hq; ++h) {
    double q1 = 0;
    for (index_t c = 0; c < D; ++c) q1 += std::abs(double(q(0, h, 0, c)));
    const double delta = scale * q1 * kmax / 254.0;
    const double bound = std::expm1(2 * delta) * vmax + vmax / 254.0 + tolerance<float>(D, L, vmax);
    for (index_t c = 0; c < D; ++c) {
      const double err = std::abs(double(o8(0, h, 0, c)) - double(o32(0, h, 0, c)));
      EXPECT_LE(err, bound) << "head " << h;
      worst = std::max(worst, err / bound);
    }
  }
  RecordProperty("int8_error_over_bound", std::to_string(worst));
  // bf16 rows: relative rounding 2^-8 per element, the same argument with Δ = scale·‖q‖₁·kmax·2^-8.
  EXPECT_LE(max_abs_diff(o16, o32), 0.05 * vmax);
}

// An int8 cache's attention is the attention of its dequantised rows (scale ·
// code, exact in float), computed in integers: each query row rounded to int16
// (steps of scale·max|q|/32767) and each tile's probabilities times the value
// scales rounded to int16 per row (steps of 1/32767 of the row's largest).
// Against a float cache holding the dequantised rows it may differ by
//   δ = scale · D · max|q| · max|k̂| / 65534   per score (half a query step
//       times the row's keys), so a factor e^{±2δ} on each probability, and
//   Bc · max|v̂| / 65534   (half a weight step on each of a tile's Bc keys; the
//       tile's largest probability is part of the row's sum),
// plus float rounding. Decoding steps (G·Lq <= 8 rows: the kernels read the
// int8 rows themselves, in integers), a chunk of 3 queries per group of 4 (12
// rows: tiles dequantised and packed, float products) and Dv = 40 (rows not a
// whole number of vectors: dequantised), each against the float cache,
// contiguous and paged (blocks of 16), which must agree bit for bit.
TEST(Int8Cache, EqualsFloatCacheOfItsDequantisedRows) {
  const index_t Hq = 8, Hkv = 2, L = 700, D = 64;
  for (index_t dv : {64, 40})
    for (index_t lq : {1, 2, 3}) {
      SCOPED_TRACE("dv=" + std::to_string(dv) + " lq=" + std::to_string(lq));
      const auto k = random_tensor<float>(1, Hkv, L, D, 60);
      const auto v = random_tensor<float>(1, Hkv, L, dv, 61);
      attn::KVCache<std::int8_t> i8(1, Hkv, L + lq, D, dv);
      i8.append(k.cview(), v.cview());
      // The dequantised rows, exactly as the cache holds them.
      Tensor<float> kd(1, Hkv, L, D), vd(1, Hkv, L, dv);
      const auto codes_k = i8.keys(), codes_v = i8.values();
      const auto sk = i8.key_scales(), sv = i8.value_scales();
      for (index_t h = 0; h < Hkv; ++h)
        for (index_t t = 0; t < L; ++t) {
          for (index_t c = 0; c < D; ++c)
            kd(0, h, t, c) = sk(0, h, t) * static_cast<float>(codes_k(0, h, t, c));
          for (index_t c = 0; c < dv; ++c)
            vd(0, h, t, c) = sv(0, h, t) * static_cast<float>(codes_v(0, h, t, c));
        }
      attn::KVCache<float> f32(1, Hkv, L + lq, D, dv);
      f32.append(kd.cview(), vd.cview());
      attn::PagedKVCache<std::int8_t> paged((L + 15) / 16 + 1, 16, Hkv, D, dv);
      const index_t seq = paged.add_sequence();
      paged.append(seq, k.cview(), v.cview());
      const auto q = random_tensor<float>(1, Hq, lq, D, 62);
      Tensor<float> o8(1, Hq, lq, dv), o32(1, Hq, lq, dv), op(1, Hq, lq, dv);
      attn::cache_attention(q.cview(), i8, o8.view, attn::causal());
      attn::cache_attention(q.cview(), f32, o32.view, attn::causal());
      attn::paged_attention(q.cview(), paged, {seq}, op.view, attn::causal());
      const double vmax = max_abs(vd), bc = 256;  // keys per tile (the engine's default)
      const double delta = D * max_abs(q) * max_abs(kd) / std::sqrt(double(D)) / 65534.0;
      const double tol =
          tolerance<float>(D, L, vmax) + std::expm1(2 * delta) * vmax + bc * vmax / 65534.0;
      const double err = max_abs_diff(o8, o32);
      EXPECT_LE(err, tol);
      RecordProperty(
          "int16_rounding_error_over_bound_dv" + std::to_string(dv) + "_lq" + std::to_string(lq),
          std::to_string(err / tol));
      EXPECT_TRUE(bitwise_equal(o8, op))
          << "paged int8 differs from contiguous int8 by " << max_abs_diff(o8, op);
    }
}

// A query row that is not finite cannot be rounded to int16: its group takes
// the float products. The head with a NaN gives NaN as the float cache does;
// the other heads of its group stay within float rounding of the float cache of
// the dequantised rows (no integer rounding in them now), and a finite group's
// heads within the integer bound above.
TEST(Int8Cache, NonFiniteQueryTakesTheFloatProducts) {
  const index_t Hq = 8, Hkv = 2, L = 300, D = 64;
  const auto k = random_tensor<float>(1, Hkv, L, D, 70);
  const auto v = random_tensor<float>(1, Hkv, L, D, 71);
  attn::KVCache<std::int8_t> i8(1, Hkv, L, D);
  i8.append(k.cview(), v.cview());
  Tensor<float> kd(1, Hkv, L, D), vd(1, Hkv, L, D);
  for (index_t h = 0; h < Hkv; ++h)
    for (index_t t = 0; t < L; ++t)
      for (index_t c = 0; c < D; ++c) {
        kd(0, h, t, c) = i8.key_scales()(0, h, t) * static_cast<float>(i8.keys()(0, h, t, c));
        vd(0, h, t, c) = i8.value_scales()(0, h, t) * static_cast<float>(i8.values()(0, h, t, c));
      }
  attn::KVCache<float> f32(1, Hkv, L, D);
  f32.append(kd.cview(), vd.cview());
  auto q = random_tensor<float>(1, Hq, 1, D, 72);
  q(0, 1, 0, 5) = std::nanf("");  // head 1: group 0 (heads 0-3)
  Tensor<float> o8(1, Hq, 1, D), o32(1, Hq, 1, D);
  attn::cache_attention(q.cview(), i8, o8.view, attn::causal());
  attn::cache_attention(q.cview(), f32, o32.view, attn::causal());
  const double vmax = max_abs(vd), float_tol = tolerance<float>(D, L, vmax);
  double qmax = 0;  // over the finite group
  for (index_t h = 4; h < Hq; ++h)
    for (index_t c = 0; c < D; ++c) qmax = std::max(qmax, std::abs(double(q(0, h, 0, c))));
  const double delta = D * qmax * max_abs(kd) / std::sqrt(double(D)) / 65534.0;
  const double int_tol = float_tol + std::expm1(2 * delta) * vmax + 256 * vmax / 65534.0;
  for (index_t h = 0; h < Hq; ++h)
    for (index_t c = 0; c < D; ++c) {
      const float a = o8(0, h, 0, c), b = o32(0, h, 0, c);
      if (h == 1) {
        EXPECT_TRUE(std::isnan(a) && std::isnan(b)) << c;
      } else if (h < 4) {
        EXPECT_LE(std::abs(double(a) - b), float_tol) << "head " << h << " col " << c;
      } else {
        EXPECT_LE(std::abs(double(a) - b), int_tol) << "head " << h << " col " << c;
      }
    }
}

// ------------------------------------------------------------------ varlen --

TEST(Varlen, EqualsOneCallPerSequence) {
  const index_t Hq = 4, Hkv = 2, D = 32;
  const std::vector<index_t> lq = {5, 0, 130, 300, 1, 64}, lk = {5, 7, 200, 300, 1500, 64};
  std::vector<index_t> cq = {0}, ck = {0};
  for (std::size_t s = 0; s < lq.size(); ++s) {
    cq.push_back(cq.back() + lq[s]);
    ck.push_back(ck.back() + lk[s]);
  }
  const auto q = random_tensor<float>(1, Hq, cq.back(), D, 60, Layout::bshd);
  const auto k = random_tensor<float>(1, Hkv, ck.back(), D, 61, Layout::bshd);
  const auto v = random_tensor<float>(1, Hkv, ck.back(), D, 62, Layout::bshd);
  auto check = [&](const auto& mask, const auto& mod) {
    Tensor<float> out(1, Hq, cq.back(), D, Layout::bshd);
    std::vector<float> lse(static_cast<std::size_t>(Hq * cq.back()));
    attn::AttentionOptions opt;
    opt.lse = attn::TensorView<float, 3>(lse.data(), {1, Hq, cq.back()});
    attn::varlen_attention(q.view, k.view, v.view, out.view, cq, ck, mask, mod, opt);
    for (std::size_t s = 0; s < lq.size(); ++s) {
      if (lq[s] == 0) continue;
      SCOPED_TRACE("sequence " + std::to_string(s));
      const auto qs = rows_of(q, cq[s], lq[s]);
      const auto ks = rows_of(k, ck[s], lk[s]), vs = rows_of(v, ck[s], lk[s]);
      Tensor<float> one(1, Hq, lq[s], D);
      std::vector<float> lse1(static_cast<std::size_t>(Hq * lq[s]));
      attn::AttentionOptions o1;
      o1.lse = attn::TensorView<float, 3>(lse1.data(), {1, Hq, lq[s]});
      attn::masked_attention(qs.cview(), ks.cview(), vs.cview(), one.view, mask, mod, o1);
      const double tol = tolerance<float>(D, lk[s], max_abs(v));
      EXPECT_LE(max_abs_diff(rows_of(out, cq[s], lq[s]), one), tol);
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < lq[s]; ++i)
          EXPECT_NEAR(lse[static_cast<std::size_t>(h * cq.back() + cq[s] + i)],
                      lse1[static_cast<std::size_t>(h * lq[s] + i)], tol * 4);
    }
  };
  check(attn::causal(), attn::no_score_mod());
  check(attn::window(40, 3), attn::alibi(attn::alibi_slopes(Hq)));
  check(attn::no_mask(), attn::softcap(5.0));
}

// ------------------------------------------------------------------- sinks --

TEST(Sinks, MatchReferenceWithExtraLogit) {
  for (const Problem& p :
       {make(1, 8, 2, 1, 3000, 64, 64), make(2, 4, 2, 70, 90, 16, 24), make(1, 2, 1, 3, 5, 8, 8)}) {
    SCOPED_TRACE(p.str());
    const Inputs<float> in(p, 70);
    std::vector<float> sinks(static_cast<std::size_t>(p.Hq));
    std::vector<double> sinks_d(sinks.size());
    for (index_t h = 0; h < p.Hq; ++h)
      sinks_d[static_cast<std::size_t>(h)] = sinks[static_cast<std::size_t>(h)] =
          h == 0 ? -std::numeric_limits<float>::infinity() : 0.7f * float(h) - 1.0f;
    attn::AttentionOptions opt;
    opt.sinks = attn::TensorView<const float, 1>(sinks.data(), {p.Hq});
    std::vector<float> lse(static_cast<std::size_t>(p.B * p.Hq * p.Lq)), lse_ref(lse.size());
    Tensor<float> out(p.B, p.Hq, p.Lq, p.Dv);
    Tensor<double> ref(p.B, p.Hq, p.Lq, p.Dv);
    const auto qd = attn_test::to_double(in.q), kd = attn_test::to_double(in.k),
               vd = attn_test::to_double(in.v);
    attn::AttentionOptions ropt;
    ropt.lse = attn::TensorView<float, 3>(lse_ref.data(), {p.B, p.Hq, p.Lq});
    attn::reference::attention_with_sinks(qd.cview(), kd.cview(), vd.cview(), ref.view, sinks_d,
                                          attn::causal(), attn::no_score_mod(), ropt);
    opt.lse = attn::TensorView<float, 3>(lse.data(), {p.B, p.Hq, p.Lq});
    attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::causal(), opt);
    expect_close(out, ref, lse, lse_ref, tolerance<float>(p.D, p.Lk, max_abs(in.v)));
  }
}

// Gradients of a forward with sinks against central differences of the fp64
// reference, for L = Σ out ∘ W: dsinks from sinks_backward, dq, dk, dv from
// attention_backward given the sink forward's out and lse. The library works
// in double except lse, stored as float: exp(s − lse) then moves by a factor
// within e^{±|lse|·2^-24}, so each gradient is within about |lse|·2^-24 of its
// size, relative; the bound allows 2^-18·(1 + max|lse|) of (1 + |g|), and
// central differences with ε = 1e-5 add ε² times the third derivative (under
// 1e-8 here), and dsinks (float) one float rounding, 2^-24 relative.
TEST(Sinks, GradientsMatchFiniteDifferences) {
  const index_t B = 2, Hq = 4, Hkv = 2, Lq = 3, Lk = 5, D = 4, Dv = 3;
  const auto q = attn_test::to_double(random_tensor<float>(B, Hq, Lq, D, 80));
  const auto k = attn_test::to_double(random_tensor<float>(B, Hkv, Lk, D, 81));
  const auto v = attn_test::to_double(random_tensor<float>(B, Hkv, Lk, Dv, 82));
  const auto w = attn_test::to_double(random_tensor<float>(B, Hq, Lq, Dv, 83));
  const std::vector<float> sinks = {-std::numeric_limits<float>::infinity(), 0.5f, -0.25f, 1.0f};
  const std::vector<double> sinks_d(sinks.begin(), sinks.end());
  const auto mask = attn::causal();  // bottom-right: every row sees at least 3 keys
  auto loss = [&](const Tensor<double>& qq, const Tensor<double>& kk, const Tensor<double>& vv,
                  const std::vector<double>& sk) {
    Tensor<double> o(B, Hq, Lq, Dv);
    attn::reference::attention_with_sinks(qq.cview(), kk.cview(), vv.cview(), o.view, sk, mask);
    double l = 0;
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < Lq; ++i)
          for (index_t c = 0; c < Dv; ++c) l += o(b, h, i, c) * w(b, h, i, c);
    return l;
  };
  // The library's forward and gradients.
  Tensor<double> out(B, Hq, Lq, Dv), dq(B, Hq, Lq, D), dk(B, Hkv, Lk, D), dv(B, Hkv, Lk, Dv);
  std::vector<float> lse(static_cast<std::size_t>(B * Hq * Lq)), dsinks(sinks.size());
  attn::AttentionOptions opt;
  opt.sinks = attn::TensorView<const float, 1>(sinks.data(), {Hq});
  opt.lse = attn::TensorView<float, 3>(lse.data(), {B, Hq, Lq});
  attn::masked_attention(q.cview(), k.cview(), v.cview(), out.view, mask, opt);
  const attn::TensorView<const float, 3> lse_view(lse.data(), {B, Hq, Lq});
  attn::attention_backward(q.cview(), k.cview(), v.cview(), out.cview(), lse_view, w.cview(),
                           dq.view, dk.view, dv.view, mask);
  attn::sinks_backward(out.cview(), lse_view, w.cview(), opt.sinks,
                       attn::TensorView<float, 1>(dsinks.data(), {Hq}));
  double lse_max = 0;
  for (float x : lse) lse_max = std::max(lse_max, std::abs(double(x)));
  const double eps = 1e-5, rel = std::ldexp(1.0, -18) * (1 + lse_max);
  auto expect_fd = [&](double got, double fd, const std::string& what) {
    EXPECT_NEAR(got, fd, rel * (1 + std::abs(fd)) + 1e-8) << what;
  };
  EXPECT_EQ(dsinks[0], 0.0f);  // no sink, no gradient
  for (index_t h = 1; h < Hq; ++h) {
    auto plus = sinks_d, minus = sinks_d;
    plus[static_cast<std::size_t>(h)] += eps;
    minus[static_cast<std::size_t>(h)] -= eps;
    const double fd = (loss(q, k, v, plus) - loss(q, k, v, minus)) / (2 * eps);
    EXPECT_GT(std::abs(fd), 1e-3) << "the sink of head " << h << " should matter";
    expect_fd(dsinks[static_cast<std::size_t>(h)], fd, "dsinks " + std::to_string(h));
  }
  // which: 0 perturbs q, 1 k, 2 v
  auto check_all = [&](Tensor<double> x, const Tensor<double>& grad, int which, const char* name) {
    for (index_t a = 0; a < x.extent(0); ++a)
      for (index_t b = 0; b < x.extent(1); ++b)
        for (index_t i = 0; i < x.extent(2); ++i)
          for (index_t c = 0; c < x.extent(3); ++c) {
            const double keep = x(a, b, i, c);
            auto at = [&](double val) {
              x(a, b, i, c) = val;
              return which == 0   ? loss(x, k, v, sinks_d)
                     : which == 1 ? loss(q, x, v, sinks_d)
                                  : loss(q, k, x, sinks_d);
            };
            const double fd = (at(keep + eps) - at(keep - eps)) / (2 * eps);
            x(a, b, i, c) = keep;
            expect_fd(grad(a, b, i, c), fd, name);
          }
  };
  check_all(q, dq, 0, "dq");
  check_all(k, dk, 1, "dk");
  check_all(v, dv, 2, "dv");
}

TEST(Sinks, BackwardRefusesBadViewsAndWritesNothing) {
  std::vector<double> o(2 * 3 * 2), d(o.size());
  std::vector<float> lse(6), sinks = {0.f, 1.f}, ds = {7.f, 7.f, 7.f};
  const attn::TensorView<const double, 4> out(o.data(), {1, 2, 3, 2}), dout(d.data(), {1, 2, 3, 2});
  const attn::TensorView<const float, 3> l(lse.data(), {1, 2, 3});
  const attn::TensorView<const float, 1> s(sinks.data(), {2});
  auto error_of = [](auto&& f) {
    try {
      f();
    } catch (const attn::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of([&] {
              attn::sinks_backward(out, l, dout, s, attn::TensorView<float, 1>(ds.data(), {3}));
            }).find("dsinks has 3 entries, expected one per query head (2)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::sinks_backward(out, attn::TensorView<const float, 3>(lse.data(), {1, 2, 2}),
                                   dout, s, attn::TensorView<float, 1>(ds.data(), {2}));
            }).find("lse has shape [1, 2, 2], expected [1, 2, 3]"),
            std::string::npos);
  // dsinks aliasing lse
  EXPECT_NE(error_of([&] {
              attn::sinks_backward(out, l, dout, s, attn::TensorView<float, 1>(lse.data(), {2}));
            }).find("dsinks overlaps lse"),
            std::string::npos);
  EXPECT_EQ(ds[0], 7.f);
  EXPECT_EQ(ds[1], 7.f);
  EXPECT_EQ(lse[0], 0.f);
}

// A row that sees no key gets zeros and lse = sink (the sink takes all the weight).
TEST(Sinks, EmptyRowGivesZerosAndTheSink) {
  const Problem p = make(1, 2, 1, 4, 4, 8, 8);
  const Inputs<float> in(p, 71);
  const std::vector<float> sinks = {0.5f, -2.0f};
  attn::AttentionOptions opt;
  opt.sinks = attn::TensorView<const float, 1>(sinks.data(), {2});
  std::vector<float> lse(8);
  opt.lse = attn::TensorView<float, 3>(lse.data(), {1, 2, 4});
  Tensor<float> out(1, 2, 4, 8);
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::key_padding({0}), opt);
  EXPECT_EQ(max_abs(out), 0.0);
  EXPECT_EQ(lse[0], 0.5f);
  EXPECT_EQ(lse[4], -2.0f);
}

// --------------------------------------------------------------- streaming --

TEST(Streaming, MatchesReferenceAndSkipsTheGap) {
  for (const Problem& p : {make(1, 4, 2, 1, 3000, 32, 32), make(1, 2, 2, 300, 500, 16, 16),
                           make(2, 2, 1, 7, 7, 8, 8)}) {
    attn_test::expect_matches_reference<float>(p, attn::streaming(4, 64));
    attn_test::expect_matches_reference<float>(p, attn::streaming(0, 0));
    attn_test::expect_matches_reference<float>(p, attn::streaming(300, 10));
  }
  // One decode row over 5000 keys with 4 sinks and a window of 64 computes
  // at most the sink tile and the window's tiles.
  const Problem p = make(1, 4, 2, 1, 5000, 32, 32);  // the tile counters only: no reference
  const Inputs<float> in(p, 5);
  Tensor<float> out(1, 4, 1, 32);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  attn::masked_attention(in.q.view, in.k.view, in.v.view, out.view, attn::streaming(4, 64), opt);
  EXPECT_LE(stats.scores, 2 * 4 * 256 * 2);  // ≤ 2 tiles of 256 keys per group's 2 rows ×2 groups
}

// ------------------------------------------------------------------ misuse --

TEST(ServingErrors, ThrowAndWriteNothing) {
  attn::KVCache<float> cache(2, 2, 64, 8);
  const auto k = random_tensor<float>(2, 2, 3, 8, 1), v = random_tensor<float>(2, 2, 3, 8, 2);
  cache.append(k.cview(), v.cview());
  const auto q = random_tensor<float>(2, 4, 1, 8, 3);
  Tensor<float> out(2, 4, 1, 8);
  out.buf.assign(out.buf.size(), 42.f);
  const auto q5 = random_tensor<float>(2, 4, 5, 8, 3);
  Tensor<float> out5(2, 4, 5, 8);
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q5.cview(), cache, out5.view);
            }).find("sequence 0 holds 3 tokens, fewer than the 5 query rows"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q.cview(), cache, {0}, out.view);
            }).find("seq_ids has 1 sequences, but q has batch 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q.cview(), cache, {0, 2}, out.view);
            }).find("sequence 2 is outside [0, 2)"),
            std::string::npos);
  const auto q7 = random_tensor<float>(2, 4, 1, 7, 3);
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q7.cview(), cache, out.view);
            }).find("q has head dim 7, but the cache holds head dim 8"),
            std::string::npos);
  const auto q3 = random_tensor<float>(2, 3, 1, 8, 3);
  Tensor<float> out3(2, 3, 1, 8);
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q3.cview(), cache, out3.view);
            }).find("the cache has 2 kv heads, which does not divide q's 3 heads"),
            std::string::npos);
  attn::AttentionOptions pos;
  pos.positions.q_offset = 1;
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q.cview(), cache, out.view, attn::causal(),
                                    attn::no_score_mod(), pos);
            }).find("options.positions must be default"),
            std::string::npos);
  const std::vector<float> bad_sinks = {0.f, 1.f, 2.f};
  attn::AttentionOptions so;
  so.sinks = attn::TensorView<const float, 1>(bad_sinks.data(), {3});
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q.cview(), cache, out.view, attn::causal(),
                                    attn::no_score_mod(), so);
            }).find("sinks has 3 entries, expected one per query head (4)"),
            std::string::npos);
  const std::vector<float> nan_sinks = {0.f, std::nanf(""), 0.f, 0.f};
  so.sinks = attn::TensorView<const float, 1>(nan_sinks.data(), {4});
  EXPECT_NE(error_of([&] {
              attn::cache_attention(q.cview(), cache, out.view, attn::causal(),
                                    attn::no_score_mod(), so);
            }).find("sink of head 1 is nan"),
            std::string::npos);

  attn::PagedKVCache<float> paged(8, 4, 2, 8);
  const index_t s0 = paged.add_sequence(), s1 = paged.add_sequence();
  const auto pk = random_tensor<float>(1, 2, 3, 8, 4), pv = random_tensor<float>(1, 2, 3, 8, 5);
  paged.append(s0, pk.cview(), pv.cview());
  paged.append(s1, pk.cview(), pv.cview());
  paged.free(s1);
  EXPECT_NE(error_of([&] {
              attn::paged_attention(q.cview(), paged, {s0, s1}, out.view);
            }).find("sequence 1 was freed"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::paged_attention(q.cview(), paged, {s0, 9}, out.view);
            }).find("sequence 9 is not a sequence of this PagedKVCache"),
            std::string::npos);

  // caller-owned pools and block tables (vLLM layout)
  {
    const index_t nb = 4, bs = 4;
    const auto kp = random_tensor<float>(nb, 2, bs, 8, 8),
               vp = random_tensor<float>(nb, 2, bs, 8, 9);
    const std::vector<int> table = {2, 0, 9, 1};  // [2 sequences, 2 entries]
    const attn::TensorView<const int, 2> bt(table.data(), {2, 2});
    EXPECT_NE(error_of([&] {
                attn::paged_attention(q.cview(), kp.cview(), vp.cview(), bt, {5, 6}, out.view);
              }).find("block_tables(1, 0) is 9, outside the pool's blocks [0, 4)"),
              std::string::npos);
    EXPECT_NE(error_of([&] {
                attn::paged_attention(q.cview(), kp.cview(), vp.cview(), bt, {9, 1}, out.view);
              }).find("lengths[0] is 9, outside [0, 8] (2 table entries of 4 tokens)"),
              std::string::npos);
    // A valid table equals the PagedKVCache holding the same tokens.
    const std::vector<int> good = {2, 0, 3, 1};
    const attn::TensorView<const int, 2> gt(good.data(), {2, 2});
    Tensor<float> raw(2, 4, 1, 8), ref(2, 4, 1, 8);
    attn::paged_attention(q.cview(), kp.cview(), vp.cview(), gt, {6, 5}, raw.view, attn::causal());
    attn::PagedKVCache<float> same(8, bs, 2, 8);
    for (index_t i = 0; i < 2; ++i) {
      const index_t sid = same.add_sequence(), len = i == 0 ? 6 : 5;
      for (index_t t = 0; t < len; ++t) {
        const index_t blk = good[static_cast<std::size_t>(2 * i + t / bs)];
        Tensor<float> kt(1, 2, 1, 8), vt(1, 2, 1, 8);
        for (index_t h = 0; h < 2; ++h)
          for (index_t c = 0; c < 8; ++c) {
            kt(0, h, 0, c) = kp(blk, h, t % bs, c);
            vt(0, h, 0, c) = vp(blk, h, t % bs, c);
          }
        same.append(sid, kt.cview(), vt.cview());
      }
    }
    attn::paged_attention(q.cview(), same, {0, 1}, ref.view, attn::causal());
    EXPECT_TRUE(bitwise_equal(raw, ref));
  }

  // varlen
  const auto vq = random_tensor<float>(1, 2, 10, 8, 1), vk = random_tensor<float>(1, 2, 12, 8, 2);
  Tensor<float> vo(1, 2, 10, 8);
  vo.buf.assign(vo.buf.size(), 42.f);
  EXPECT_NE(error_of([&] {
              attn::varlen_attention(vq.view, vk.view, vk.view, vo.view, std::vector<int>{0, 4, 10},
                                     std::vector<int>{0, 5, 11});
            }).find("cu_seqlens_k ends at 11, but the packed length is 12"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::varlen_attention(vq.view, vk.view, vk.view, vo.view,
                                     std::vector<int>{0, 6, 4, 10}, std::vector<int>{0, 5, 6, 12});
            }).find("cu_seqlens_q[2] = 4 is less than cu_seqlens_q[1] = 6"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::varlen_attention(vq.view, vk.view, vk.view, vo.view, std::vector<int>{0, 10},
                                     std::vector<int>{0, 5, 12});
            }).find("cu_seqlens_q has 2 entries, cu_seqlens_k 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attn::varlen_attention(vq.view, vk.view, vk.view, vo.view, std::vector<int>{1, 10},
                                     std::vector<int>{0, 12});
            }).find("cu_seqlens_q[0] is 1, must be 0"),
            std::string::npos);
  for (float x : out.buf) ASSERT_EQ(x, 42.f);
  for (float x : vo.buf) ASSERT_EQ(x, 42.f);
}

}  // namespace
