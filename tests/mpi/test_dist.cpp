// tests/mpi/test_dist.cpp — ring and all-to-all attention across MPI ranks
// against the one-process fp64 reference. Run under mpirun with 1 to 4
// ranks (ctest does). Every rank builds the same whole-sequence inputs from
// one seed, keeps its shard, and compares its shard of the result.
#include <attn/dist/ring.hpp>
#include <attn/dist/ring_backward.hpp>
#include <attn/dist/ulysses.hpp>
#include <attn/dist/ulysses_backward.hpp>
#include <attn/reference/backward.hpp>

#include "support.hpp"

#include <mpi.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn::dist::SeqLayout;
using attn_test::Tensor;

int rank_() { return attn::dist::detail::comm_rank(MPI_COMM_WORLD); }
int ranks_() { return attn::dist::detail::comm_size(MPI_COMM_WORLD); }

enum class Algo { ring, ulysses };

struct Case {
  index_t B = 1, Hq = 2, Hkv = 2, Lq = 20, Lk = 20, D = 8, Dv = 8;
  SeqLayout layout = SeqLayout::contiguous;
  Algo algo = Algo::ring;
  index_t block = 4;  // small tiles: several tiles per block and step
  std::string str() const {
    return "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
           " Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk) + " D=" + std::to_string(D) +
           " " + attn::dist::layout_name(layout) + (algo == Algo::ring ? " ring" : " ulysses") +
           " ranks=" + std::to_string(ranks_());
  }
};

/// Runs the distributed call in T on this rank's shard and compares out and
/// lse with this rank's shard of the fp64 reference. The tolerance is the
/// one-process bound (tests/support.hpp) plus the merge's rounding: each of
/// the s merges rounds the weights exp(lse_i − lse) through lse values in the
/// accumulation type L (double for T = double, whose lse the call writes in
/// double), a relative error of about eps_L·(|lse| + 2) per merge.
template <class T, class Mask, class Mod = attn::NoScoreMod>
attn::dist::RingTimings expect_matches(const Case& c, const Mask& mask, const Mod& mod = {}) {
  SCOPED_TRACE(c.str());
  const int me = rank_(), p = ranks_();
  const auto prob = attn_test::make(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D, c.Dv);
  const attn_test::Inputs<T> in(prob, 11);
  std::vector<float> lse_ref;
  const Tensor<double> ref = attn_test::reference_output(in, prob, mask, mod, {}, &lse_ref);

  const index_t lq = attn::dist::shard_length(c.Lq, me, p, c.layout);
  const index_t lk = attn::dist::shard_length(c.Lk, me, p, c.layout);
  Tensor<T> q(c.B, c.Hq, lq, c.D), k(c.B, c.Hkv, lk, c.D), v(c.B, c.Hkv, lk, c.Dv),
      out(c.B, c.Hq, lq, c.Dv);
  Tensor<double> ref_local(c.B, c.Hq, lq, c.Dv);
  using L = attn::detail::accum_t<T>;
  std::vector<L> lse(static_cast<std::size_t>(c.B * c.Hq * lq));
  std::vector<float> lse_ref_local(lse.size());
  const attn::TensorView<float, 3> lse_full(lse_ref.data(), {c.B, c.Hq, c.Lq});
  const attn::TensorView<L, 3> lse_view(lse.data(), {c.B, c.Hq, lq});
  attn::dist::shard(in.q.view, q.view, me, p, c.layout);
  attn::dist::shard(in.k.view, k.view, me, p, c.layout);
  attn::dist::shard(in.v.view, v.view, me, p, c.layout);
  attn::dist::shard(ref.view, ref_local.view, me, p, c.layout);
  attn::dist::shard(lse_full, attn::TensorView<float, 3>(lse_ref_local.data(), {c.B, c.Hq, lq}), me,
                    p, c.layout);

  attn::dist::RingTimings timings;
  attn::dist::DistOptions opt;
  opt.layout = c.layout;
  opt.lse = lse_view;
  opt.block_q = opt.block_k = c.block;
  opt.num_threads = 1;
  opt.timings = &timings;
  if (c.algo == Algo::ring)
    attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view, mask, mod,
                               opt);
  else
    attn::dist::ulysses_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view, mask,
                                  mod, opt);

  double lse_max = 0;
  for (float x : lse_ref)
    if (std::isfinite(x)) lse_max = std::max(lse_max, std::abs(static_cast<double>(x)));
  const double merges = c.algo == Algo::ring ? 2.0 * p : 0.0;
  const double vmax = attn_test::max_abs(in.v);
  const double tol = attn_test::tolerance<T>(c.D, c.Lk, vmax) +
                     4.0 * merges * attn_test::eps<L>() * (lse_max + 2.0) * std::max(vmax, 1.0);
  EXPECT_LE(attn_test::max_abs_diff(out, ref_local), tol);
  // The reference's lse comes rounded to float: one more float rounding.
  const double lse_tol = tol + attn_test::eps<float>();
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(lse_ref_local[i]))
      EXPECT_EQ(static_cast<double>(lse[i]), static_cast<double>(lse_ref_local[i]))
          << "lse row " << i;
    else
      EXPECT_NEAR(lse[i], lse_ref_local[i], lse_tol * (1.0 + std::abs(lse_ref_local[i])))
          << "lse row " << i;
  }
  return timings;
}

Case ring_case(SeqLayout layout, index_t per_rank = 6) {
  Case c;
  c.layout = layout;
  c.Lq = c.Lk = 2 * per_rank * ranks_();  // divides by 2p: zigzag can split it
  return c;
}

// ------------------------------------------------------------------- ring --

TEST(Ring, DenseContiguousAndZigzag) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_matches<float>(ring_case(layout), attn::no_mask());
    EXPECT_EQ(t.steps, ranks_());
    EXPECT_EQ(t.computed_steps, ranks_());
  }
}

TEST(Ring, CausalContiguousAndZigzag) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_matches<float>(ring_case(layout), attn::causal());
    // Contiguous: rank r sees only ranks <= r. Zigzag: every rank computes every step.
    EXPECT_EQ(t.computed_steps, layout == SeqLayout::zigzag ? ranks_() : rank_() + 1);
  }
  expect_matches<float>(ring_case(SeqLayout::zigzag), attn::causal_top_left());
}

TEST(Ring, ZigzagGivesEveryRankTheSameCausalWork) {
  // Counted, not timed: the scores each rank computes (options.stats) under a causal mask.
  const int p = ranks_();
  for (SeqLayout layout : {SeqLayout::zigzag, SeqLayout::contiguous}) {
    const index_t L = 2 * 16;  // two chunks of 16 rows per rank
    Tensor<float> q = attn_test::random_tensor<float>(1, 2, L, 8, 5 + rank_());
    Tensor<float> k = attn_test::random_tensor<float>(1, 2, L, 8, 9 + rank_());
    Tensor<float> v = attn_test::random_tensor<float>(1, 2, L, 8, 13 + rank_());
    Tensor<float> out(1, 2, L, 8);
    attn::AttentionStats stats;
    attn::dist::DistOptions opt;
    opt.layout = layout;
    opt.block_q = opt.block_k = 4;
    opt.num_threads = 1;
    opt.stats = &stats;
    attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                               attn::causal(), attn::no_score_mod(), opt);
    std::int64_t lo = stats.scores, hi = stats.scores;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_GT(lo, 0);
    if (layout == SeqLayout::zigzag) {
      EXPECT_EQ(lo, hi) << attn::dist::layout_name(layout);
    } else if (p > 1) {
      EXPECT_LT(lo, hi) << attn::dist::layout_name(layout);
    }
  }
}

TEST(Ring, CausalWindowStopsTheRingEarly) {
  // Slices of 12 rows, a window of 5 keys back: only the previous rank's slice is needed.
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_matches<float>(ring_case(layout), attn::window(5, 0));
    if (layout == SeqLayout::contiguous) {
      EXPECT_EQ(t.steps, std::min(ranks_(), 2));
    }
    EXPECT_LE(t.steps, ranks_());
  }
  expect_matches<float>(ring_case(SeqLayout::contiguous), attn::window(3, 4));
}

TEST(Ring, AlibiKeyPaddingAndSoftcap) {
  Case c = ring_case(SeqLayout::zigzag);
  c.B = 2;
  const auto slopes = attn::alibi_slopes(c.Hq);
  expect_matches<float>(c, attn::causal(), attn::alibi(slopes));
  expect_matches<float>(c, attn::key_padding({c.Lk - 5, index_t{3}}),
                        attn::compose(attn::alibi(slopes), attn::softcap(5.0)));
  // A batch that sees no key: zeros and lse = -inf, merged as such.
  expect_matches<float>(c, attn::key_padding({index_t{0}, c.Lk}));
}

TEST(Ring, GqaOddDimsAndCrossLengths) {
  Case c = ring_case(SeqLayout::contiguous);
  c.Hq = 6;
  c.Hkv = 2;
  c.D = 11;
  c.Dv = 7;
  expect_matches<float>(c, attn::causal());
  c.Lq = 3 * ranks_() + 1;  // Lq ≠ Lk, and neither divides by the ranks
  c.Lk = 5 * ranks_() + 2;
  expect_matches<float>(c, attn::causal());
  expect_matches<float>(c, attn::no_mask(), attn::alibi(attn::alibi_slopes(c.Hq)));
}

TEST(Ring, UnevenSlicesOfAContiguousSequence) {
  Case c;
  c.Lq = c.Lk = 7 * ranks_() + 3;  // shard() gives ranks 7 or 8 rows
  expect_matches<float>(c, attn::causal());
  expect_matches<float>(c, attn::window(4, 2));
}

TEST(Ring, ReducedPrecisionAndDouble) {
  Case c = ring_case(SeqLayout::zigzag);
  c.Hkv = 1;
  expect_matches<Eigen::bfloat16>(c, attn::causal());
  expect_matches<Eigen::half>(c, attn::no_mask());
  expect_matches<double>(c, attn::causal());
}

TEST(Ring, BoolMaskIsIndexedGlobally) {
  Case c = ring_case(SeqLayout::zigzag);
  std::vector<char> keep(static_cast<std::size_t>(c.Lq * c.Lk));
  for (index_t i = 0; i < c.Lq; ++i)
    for (index_t j = 0; j < c.Lk; ++j)
      keep[static_cast<std::size_t>(i * c.Lk + j)] = (i * 7 + j * 3) % 5 != 0;
  static_assert(sizeof(bool) == sizeof(char), "bool is one byte");
  const attn::TensorView<const bool, 4> view(reinterpret_cast<const bool*>(keep.data()),
                                             {1, 1, c.Lq, c.Lk});
  expect_matches<float>(c, attn::bool_mask(view));
}

// --------------------------------------------------------- ring backward --

/// The whole problem's gradients (fp64 reference backward) and what one rank
/// holds of everything the ring backward reads and writes.
template <class T>
struct BackwardRun {
  Tensor<double> dq_ref, dk_ref, dv_ref;  // this rank's shard of the reference gradients
  Tensor<T> dq, dk, dv;                   // this rank's ring gradients
  Tensor<double> dk_missing, dv_missing;  // the reference without the last rank's queries
  double tol_q = 0, tol_k = 0, tol_v = 0;
  attn::dist::RingTimings timings;
};

/// Forward ring (out, lse) then ring backward on this rank's shard; the fp64
/// reference backward on the whole sequence.
///
/// Tolerance: the one-process bound of tests/test_backward.cpp,
/// 16·eps_T·(√D + √Lk + 4)·max(|ref|, 1), plus what the ring adds, with the
/// same growth factor (√D + √Lk + 4)·max(|ref|, 1): the forward's out and lse
/// carry the merges' relative error, 4·2p·eps_f32·(|lse| + 2) (the forward
/// test's bound), which enters P = exp(S − lse) and Δ = rowsum(dO∘O)
/// (counted twice); and each gradient is a sum of one partial per ring step
/// and query piece (at most 8 per step here), rounded in the accumulation
/// type: 8p·eps_acc.
template <class T, class Mask, class Mod = attn::NoScoreMod>
BackwardRun<T> ring_backward(const Case& c, const Mask& mask, const Mod& mod = {},
                             int threads = 1) {
  const int me = rank_(), p = ranks_();
  const auto prob = attn_test::make(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D, c.Dv);
  const attn_test::Inputs<T> in(prob, 11);
  const Tensor<T> dout_full = attn_test::random_tensor<T>(c.B, c.Hq, c.Lq, c.Dv, 29);
  const Tensor<double> qd = attn_test::to_double(in.q), kd = attn_test::to_double(in.k),
                       vd = attn_test::to_double(in.v), dod = attn_test::to_double(dout_full);

  // Reference gradients, and the same without the last rank's query rows: the
  // gradient is linear in each row of dout, so zeroing those rows removes
  // exactly their contribution to dk, dv (what a ring that skipped one step would give).
  BackwardRun<T> run{};
  Tensor<double> gq(c.B, c.Hq, c.Lq, c.D), gk(c.B, c.Hkv, c.Lk, c.D), gv(c.B, c.Hkv, c.Lk, c.Dv);
  attn::reference::attention_backward(qd.cview(), kd.cview(), vd.cview(), dod.cview(), gq.view,
                                      gk.view, gv.view, mask, mod);
  Tensor<double> dod_cut = dod;
  for (const auto& ch : attn::dist::shard_chunks(c.Lq, p - 1, p, c.layout))
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hq; ++h)
        for (index_t i = ch.begin; i < ch.begin + ch.length; ++i)
          for (index_t d = 0; d < c.Dv; ++d) dod_cut(b, h, i, d) = 0;
  Tensor<double> mq(c.B, c.Hq, c.Lq, c.D), mk(c.B, c.Hkv, c.Lk, c.D), mv(c.B, c.Hkv, c.Lk, c.Dv);
  attn::reference::attention_backward(qd.cview(), kd.cview(), vd.cview(), dod_cut.cview(), mq.view,
                                      mk.view, mv.view, mask, mod);

  const index_t lq = attn::dist::shard_length(c.Lq, me, p, c.layout);
  const index_t lk = attn::dist::shard_length(c.Lk, me, p, c.layout);
  Tensor<T> q(c.B, c.Hq, lq, c.D), k(c.B, c.Hkv, lk, c.D), v(c.B, c.Hkv, lk, c.Dv),
      out(c.B, c.Hq, lq, c.Dv), dout(c.B, c.Hq, lq, c.Dv);
  run.dq = Tensor<T>(c.B, c.Hq, lq, c.D);
  run.dk = Tensor<T>(c.B, c.Hkv, lk, c.D);
  run.dv = Tensor<T>(c.B, c.Hkv, lk, c.Dv);
  run.dq_ref = Tensor<double>(c.B, c.Hq, lq, c.D);
  run.dk_ref = Tensor<double>(c.B, c.Hkv, lk, c.D);
  run.dv_ref = Tensor<double>(c.B, c.Hkv, lk, c.Dv);
  run.dk_missing = Tensor<double>(c.B, c.Hkv, lk, c.D);
  run.dv_missing = Tensor<double>(c.B, c.Hkv, lk, c.Dv);
  attn::dist::shard(in.q.view, q.view, me, p, c.layout);
  attn::dist::shard(in.k.view, k.view, me, p, c.layout);
  attn::dist::shard(in.v.view, v.view, me, p, c.layout);
  attn::dist::shard(dout_full.view, dout.view, me, p, c.layout);
  attn::dist::shard(gq.view, run.dq_ref.view, me, p, c.layout);
  attn::dist::shard(gk.view, run.dk_ref.view, me, p, c.layout);
  attn::dist::shard(gv.view, run.dv_ref.view, me, p, c.layout);
  attn::dist::shard(mk.view, run.dk_missing.view, me, p, c.layout);
  attn::dist::shard(mv.view, run.dv_missing.view, me, p, c.layout);

  std::vector<float> lse(static_cast<std::size_t>(c.B * c.Hq * lq));
  attn::dist::DistOptions opt;
  opt.layout = c.layout;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {c.B, c.Hq, lq});
  opt.block_q = opt.block_k = c.block;
  opt.num_threads = threads;
  if (c.algo == Algo::ring)
    attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view, mask, mod,
                               opt);
  else
    attn::dist::ulysses_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view, mask,
                                  mod, opt);
  opt.lse = {};
  opt.timings = &run.timings;
  auto backward = [&](const auto& lse_in) {
    if (c.algo == Algo::ring)
      attn::dist::ring_attention_backward(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(),
                                          out.cview(), lse_in, dout.cview(), run.dq.view,
                                          run.dk.view, run.dv.view, mask, mod, opt);
    else
      attn::dist::ulysses_attention_backward(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(),
                                             out.cview(), lse_in, dout.cview(), run.dq.view,
                                             run.dk.view, run.dv.view, mask, mod, opt);
  };
  double lse_max = 0;
  for (float x : lse)
    if (std::isfinite(x)) lse_max = std::max(lse_max, std::abs(static_cast<double>(x)));
  MPI_Allreduce(MPI_IN_PLACE, &lse_max, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if constexpr (std::is_same<T, double>::value) {
    // fp64 storage: the lse in fp64 (from the reference probabilities), as a
    // caller keeping fp64 lse would pass it; out is the ring's.
    attn::AttentionShape s;
    s.batch = c.B, s.q_heads = c.Hq, s.kv_heads = c.Hkv, s.lq = c.Lq, s.lk = c.Lk, s.d = c.D,
    s.dv = c.Dv;
    const Mask m = mask.bind(s);
    const Mod md = mod.bind(s);
    std::vector<double> full, pr, l;
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hq; ++h) {
        attn::reference::probabilities(qd.cview(), kd.cview(), s, m, md,
                                       1.0 / std::sqrt(static_cast<double>(c.D)), b, h, pr, l);
        full.insert(full.end(), l.begin(), l.end());
      }
    std::vector<double> lse64(lse.size());
    attn::dist::shard(attn::TensorView<double, 3>(full.data(), {c.B, c.Hq, c.Lq}),
                      attn::TensorView<double, 3>(lse64.data(), {c.B, c.Hq, lq}), me, p, c.layout);
    backward(attn::TensorView<const double, 3>(lse64.data(), {c.B, c.Hq, lq}));
  } else {
    backward(attn::TensorView<const float, 3>(lse.data(), {c.B, c.Hq, lq}));
  }

  using Acc = attn::dist::detail::dist_accum_t<T>;
  const double growth =
      std::sqrt(static_cast<double>(c.D)) + std::sqrt(static_cast<double>(c.Lk)) + 4.0;
  // The all-to-all neither merges nor sums across ranks: its bound is the one-process one.
  const double merges = c.algo == Algo::ring ? 2.0 * p : 0.0;
  const double ring_rel = 2.0 * 4.0 * merges * attn_test::eps<float>() * (lse_max + 2.0) +
                          (c.algo == Algo::ring ? 8.0 * p * attn_test::eps<Acc>() : 0.0);
  auto tol = [&](const Tensor<double>& ref) {
    const double m = std::max(attn_test::max_abs(ref), 1.0);
    return (16.0 * attn_test::eps<T>() + ring_rel) * growth * m;
  };
  run.tol_q = tol(gq);
  run.tol_k = tol(gk);
  run.tol_v = tol(gv);
  return run;
}

template <class T, class Mask, class Mod = attn::NoScoreMod>
attn::dist::RingTimings expect_backward_matches(const Case& c, const Mask& mask,
                                                const Mod& mod = {}) {
  SCOPED_TRACE(c.str() + " backward");
  const BackwardRun<T> r = ring_backward<T>(c, mask, mod);
  EXPECT_LE(attn_test::max_abs_diff(r.dq, r.dq_ref), r.tol_q) << "dq";
  EXPECT_LE(attn_test::max_abs_diff(r.dk, r.dk_ref), r.tol_k) << "dk";
  EXPECT_LE(attn_test::max_abs_diff(r.dv, r.dv_ref), r.tol_v) << "dv";
  return r.timings;
}

TEST(RingBackward, DenseContiguousAndZigzag) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_backward_matches<float>(ring_case(layout), attn::no_mask());
    EXPECT_EQ(t.steps, ranks_());
    EXPECT_EQ(t.computed_steps, ranks_());
  }
}

TEST(RingBackward, CausalContiguousAndZigzag) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_backward_matches<float>(ring_case(layout), attn::causal());
    EXPECT_EQ(t.computed_steps, layout == SeqLayout::zigzag ? ranks_() : rank_() + 1);
  }
}

TEST(RingBackward, ZigzagGivesEveryRankTheSameCausalWork) {
  // Counted, not timed: the scores each rank's backward recomputes (options.stats).
  const int p = ranks_();
  for (SeqLayout layout : {SeqLayout::zigzag, SeqLayout::contiguous}) {
    const index_t L = 2 * 16;  // two chunks of 16 rows per rank
    Tensor<float> q = attn_test::random_tensor<float>(1, 2, L, 8, 5 + rank_());
    Tensor<float> k = attn_test::random_tensor<float>(1, 2, L, 8, 9 + rank_());
    Tensor<float> v = attn_test::random_tensor<float>(1, 2, L, 8, 13 + rank_());
    Tensor<float> dout = attn_test::random_tensor<float>(1, 2, L, 8, 17 + rank_());
    Tensor<float> out(1, 2, L, 8), dq(1, 2, L, 8), dk(1, 2, L, 8), dv(1, 2, L, 8);
    std::vector<float> lse(static_cast<std::size_t>(2 * L));
    attn::AttentionStats stats;
    attn::dist::DistOptions opt;
    opt.layout = layout;
    opt.block_q = opt.block_k = 4;
    opt.num_threads = 1;
    opt.lse = attn::TensorView<float, 3>(lse.data(), {1, 2, L});
    attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                               attn::causal(), attn::no_score_mod(), opt);
    opt.lse = {};
    opt.stats = &stats;
    attn::dist::ring_attention_backward(
        MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.cview(),
        attn::TensorView<const float, 3>(lse.data(), {1, 2, L}), dout.cview(), dq.view, dk.view,
        dv.view, attn::causal(), attn::no_score_mod(), opt);
    std::int64_t lo = stats.scores, hi = stats.scores;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_GT(lo, 0);
    if (layout == SeqLayout::zigzag) {
      EXPECT_EQ(lo, hi) << attn::dist::layout_name(layout);
    } else if (p > 1) {
      EXPECT_LT(lo, hi) << attn::dist::layout_name(layout);
    }
  }
}

TEST(RingBackward, WindowStopsTheRingEarly) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const auto t = expect_backward_matches<float>(ring_case(layout), attn::window(5, 0));
    if (layout == SeqLayout::contiguous) {
      EXPECT_EQ(t.steps, std::min(ranks_(), 2));
    }
  }
  expect_backward_matches<float>(ring_case(SeqLayout::contiguous), attn::window(3, 4));
}

TEST(RingBackward, AlibiKeyPaddingAndSoftcap) {
  Case c = ring_case(SeqLayout::zigzag);
  c.B = 2;
  const auto slopes = attn::alibi_slopes(c.Hq);
  expect_backward_matches<float>(c, attn::causal(), attn::alibi(slopes));
  expect_backward_matches<float>(c, attn::key_padding({c.Lk - 5, index_t{3}}),
                                 attn::compose(attn::alibi(slopes), attn::softcap(5.0)));
  // A batch that sees no key: zero gradients.
  expect_backward_matches<float>(c, attn::key_padding({index_t{0}, c.Lk}));
}

TEST(RingBackward, GqaOddDimsCrossAndUnevenLengths) {
  Case c = ring_case(SeqLayout::contiguous);
  c.Hq = 6;
  c.Hkv = 2;
  c.D = 11;
  c.Dv = 7;
  expect_backward_matches<float>(c, attn::causal());
  expect_backward_matches<float>(ring_case(SeqLayout::zigzag), attn::causal());
  c.Lq = 3 * ranks_() + 1;  // Lq ≠ Lk, and neither divides by the ranks
  c.Lk = 5 * ranks_() + 2;
  expect_backward_matches<float>(c, attn::causal());
  expect_backward_matches<float>(c, attn::no_mask(), attn::alibi(attn::alibi_slopes(c.Hq)));
  Case u;
  u.Lq = u.Lk = 7 * ranks_() + 3;  // shard() gives ranks 7 or 8 rows
  expect_backward_matches<float>(u, attn::window(4, 2));
}

TEST(RingBackward, ReducedPrecisionAndDouble) {
  Case c = ring_case(SeqLayout::zigzag);
  c.Hkv = 1;
  expect_backward_matches<Eigen::bfloat16>(c, attn::causal());
  expect_backward_matches<Eigen::half>(c, attn::no_mask());
  expect_backward_matches<double>(c, attn::causal());
  c.layout = SeqLayout::contiguous;
  expect_backward_matches<double>(c, attn::window(5, 0), attn::alibi(attn::alibi_slopes(c.Hq)));
}

TEST(RingBackward, ToleranceCatchesAMissingStep) {
  // The reference without the last rank's queries is what a ring that dropped the
  // step where those queries meet a slice would give: the tolerance must reject it.
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    SCOPED_TRACE(attn::dist::layout_name(layout));
    const auto r = ring_backward<float>(ring_case(layout), attn::no_mask());
    EXPECT_LE(attn_test::max_abs_diff(r.dk, r.dk_ref), r.tol_k);
    EXPECT_GT(attn_test::max_abs_diff(r.dk, r.dk_missing), 10 * r.tol_k);
    EXPECT_GT(attn_test::max_abs_diff(r.dv, r.dv_missing), 10 * r.tol_v);
  }
}

TEST(RingBackward, BitwiseIdenticalForAnyThreadCountAndRun) {
  Case c = ring_case(SeqLayout::zigzag, 20);
  c.B = 2;
  c.Hq = 4;
  c.Hkv = 2;
  const auto a = ring_backward<float>(c, attn::causal(), attn::no_score_mod(), 1);
  const auto b = ring_backward<float>(c, attn::causal(), attn::no_score_mod(), 3);
  const auto again = ring_backward<float>(c, attn::causal(), attn::no_score_mod(), 3);
  EXPECT_EQ(a.dq.buf, b.dq.buf);
  EXPECT_EQ(a.dk.buf, b.dk.buf);
  EXPECT_EQ(a.dv.buf, b.dv.buf);
  EXPECT_EQ(b.dk.buf, again.dk.buf);
  EXPECT_EQ(b.dq.buf, again.dq.buf);
}

// ---------------------------------------------------------------- ulysses --

Case ulysses_case(SeqLayout layout) {
  Case c = ring_case(layout);
  c.algo = Algo::ulysses;
  c.Hq = 2 * ranks_();
  c.Hkv = ranks_();
  return c;
}

TEST(Ulysses, MatchesOneProcess) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    Case c = ulysses_case(layout);
    expect_matches<float>(c, attn::no_mask());
    expect_matches<float>(c, attn::causal(), attn::alibi(attn::alibi_slopes(c.Hq)));
    expect_matches<float>(c, attn::window(5, 0));
    c.B = 2;
    expect_matches<float>(c, attn::key_padding({c.Lk - 3, index_t{2}}));
    expect_matches<Eigen::bfloat16>(c, attn::causal());
  }
  Case c = ulysses_case(SeqLayout::contiguous);
  c.Lq = 4 * ranks_() + 1;  // uneven slices, Lq ≠ Lk
  c.Lk = 6 * ranks_() + 3;
  expect_matches<float>(c, attn::causal());
}

TEST(UlyssesBackward, MatchesOneProcess) {
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    Case c = ulysses_case(layout);
    expect_backward_matches<float>(c, attn::no_mask());
    expect_backward_matches<float>(c, attn::causal(), attn::alibi(attn::alibi_slopes(c.Hq)));
    expect_backward_matches<float>(c, attn::window(5, 0));
    c.B = 2;
    expect_backward_matches<float>(c, attn::key_padding({c.Lk - 3, index_t{2}}));
    expect_backward_matches<Eigen::bfloat16>(c, attn::causal());
    expect_backward_matches<double>(c, attn::causal());
  }
  Case c = ulysses_case(SeqLayout::contiguous);
  c.Lq = 4 * ranks_() + 1;  // uneven slices, Lq ≠ Lk
  c.Lk = 6 * ranks_() + 3;
  expect_backward_matches<float>(c, attn::causal());
}

// ----------------------------------------------------------------- errors --

/// Runs `call` on every rank; every rank must throw attn::Error whose message
/// contains `what`, and the output must be unchanged.
template <class F>
void expect_fails_everywhere(F&& call, const std::string& what) {
  bool threw = false;
  try {
    call();
  } catch (const attn::Error& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
  EXPECT_TRUE(threw) << "expected attn::Error with \"" << what << "\" on rank " << rank_();
}

TEST(DistErrors, AShapeThatDiffersOnOneRankFailsOnAll) {
  const int me = rank_(), p = ranks_();
  const index_t L = 4;
  const index_t d = (me == p - 1 && p > 1) ? 6 : 8;  // the last rank disagrees on D
  Tensor<float> q(1, 2, L, d), k(1, 2, L, d), v(1, 2, L, 8), out(1, 2, L, 8);
  std::fill(out.buf.begin(), out.buf.end(), 42.f);
  for (Algo algo : {Algo::ring, Algo::ulysses}) {
    if (p == 1) break;
    expect_fails_everywhere(
        [&] {
          if (algo == Algo::ring)
            attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view);
          else
            attn::dist::ulysses_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(),
                                          out.view);
        },
        "head dim D is 6 on rank " + std::to_string(p - 1) + " but 8 on rank 0");
    for (float x : out.buf) EXPECT_EQ(x, 42.f);
  }
}

TEST(DistErrors, ALocalErrorOnOneRankFailsOnAll) {
  const int me = rank_(), p = ranks_();
  const int bad = p / 2;
  Tensor<float> q(1, 2, 4, 8), k(1, 2, 4, 8), v(1, 2, 4, 8);
  Tensor<float> out(1, 2, 4, me == bad ? 9 : 8);
  std::fill(out.buf.begin(), out.buf.end(), 42.f);
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                                   attn::causal());
      },
      "ring_attention failed on rank " + std::to_string(bad) + " of " + std::to_string(p) +
          ": out has shape [1, 2, 4, 9]");
  for (float x : out.buf) EXPECT_EQ(x, 42.f);
}

TEST(DistErrors, AMaskThatRulesOutOtherBlocksOnOneRankFailsOnAll) {
  // Rank 0 attends densely, the others causally: their rings would run different steps.
  if (ranks_() == 1) GTEST_SKIP() << "one rank: nothing to disagree with";
  const index_t L = 4;
  Tensor<float> q(1, 2, L, 8), k(1, 2, L, 8), v(1, 2, L, 8), out(1, 2, L, 8);
  std::fill(out.buf.begin(), out.buf.end(), 42.f);
  const attn::Window mask = rank_() == 0 ? attn::window(-1, -1) : attn::window(-1, 0);
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view, mask);
      },
      "differs across ranks; every rank must pass the same mask and modifier");
  for (float x : out.buf) EXPECT_EQ(x, 42.f);
}

TEST(DistErrors, PositionsArePlacedByTheCall) {
  Tensor<float> q(1, 2, 4, 8), k(1, 2, 4, 8), v(1, 2, 4, 8), out(1, 2, 4, 8);
  attn::dist::DistOptions opt;
  opt.positions.q_offset = 3;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                                   attn::causal(), attn::no_score_mod(), opt);
      },
      "options.positions is {3, 0, 0, 0}; leave it default");
}

TEST(DistErrors, ZigzagNeedsEqualChunks) {
  const int me = rank_(), p = ranks_();
  const index_t L = me == 0 ? 5 : 4;  // 5 rows cannot be two equal chunks
  Tensor<float> q(1, 2, L, 8), k(1, 2, L, 8), v(1, 2, L, 8), out(1, 2, L, 8);
  attn::dist::DistOptions opt;
  opt.layout = SeqLayout::zigzag;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                                   attn::causal(), attn::no_score_mod(), opt);
      },
      "zigzag layout needs every rank to hold 2 of " + std::to_string(2 * p) + " equal chunks");
  EXPECT_THROW(attn::dist::shard_chunks(10, 0, 3, SeqLayout::zigzag), attn::Error);
}

TEST(DistErrors, UlyssesNeedsHeadsDividingByRanks) {
  if (ranks_() == 1) GTEST_SKIP() << "one rank: every head count divides";
  const index_t H = ranks_() + 1;
  Tensor<float> q(1, H, 4, 8), k(1, H, 4, 8), v(1, H, 4, 8), out(1, H, 4, 8);
  expect_fails_everywhere(
      [&] {
        attn::dist::ulysses_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view);
      },
      "must divide by the " + std::to_string(ranks_()) + " ranks");
}

TEST(DistErrors, AMaskThatDiffersFailsOnAll) {
  // key_padding is bound to the whole problem: a length past Lk on one rank fails on every rank.
  const int me = rank_(), p = ranks_();
  Tensor<float> q(1, 2, 4, 8), k(1, 2, 4, 8), v(1, 2, 4, 8), out(1, 2, 4, 8);
  const index_t len = me == p - 1 ? 4 * p + 1 : 4 * p;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, q.cview(), k.cview(), v.cview(), out.view,
                                   attn::key_padding({len}));
      },
      "key_padding length of batch 0 is " + std::to_string(4 * p + 1));
}

/// Small backward arguments of one rank; dq, dk, dv filled with 42.
struct BackwardArgs {
  Tensor<float> q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse;
  BackwardArgs(index_t L, index_t dq_len)
      : q(1, 2, L, 8), k(1, 2, L, 8), v(1, 2, L, 8), out(1, 2, L, 8), dout(1, 2, L, 8),
        dq(1, 2, dq_len, 8), dk(1, 2, L, 8), dv(1, 2, L, 8), lse(static_cast<std::size_t>(2 * L)) {
    for (auto* t : {&dq, &dk, &dv}) std::fill(t->buf.begin(), t->buf.end(), 42.f);
  }
  attn::TensorView<const float, 3> lse_view() const {
    return attn::TensorView<const float, 3>(lse.data(), {1, 2, q.extent(2)});
  }
  bool untouched() const {
    for (const auto* t : {&dq, &dk, &dv})
      for (float x : t->buf)
        if (x != 42.f) return false;
    return true;
  }
};

TEST(DistErrors, BackwardShapeErrorOnOneRankFailsOnAll) {
  const int me = rank_(), p = ranks_();
  const int bad = p - 1;
  BackwardArgs a(4, me == bad ? 5 : 4);
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention_backward(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(),
                                            a.out.cview(), a.lse_view(), a.dout.cview(), a.dq.view,
                                            a.dk.view, a.dv.view, attn::causal());
      },
      "ring_attention_backward failed on rank " + std::to_string(bad) + " of " + std::to_string(p) +
          ": dq has shape [1, 2, 5, 8], expected [1, 2, 4, 8]");
  EXPECT_TRUE(a.untouched());
}

TEST(DistErrors, BackwardOutputOverlappingAnInputFailsOnAll) {
  BackwardArgs a(4, 4);
  const int bad = ranks_() / 2;
  // On one rank dk is k itself.
  const auto dk = rank_() == bad ? a.k.view : a.dk.view;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention_backward(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(),
                                            a.out.cview(), a.lse_view(), a.dout.cview(), a.dq.view,
                                            dk, a.dv.view);
      },
      "failed on rank " + std::to_string(bad));
  EXPECT_TRUE(a.untouched());
}

TEST(DistErrors, BackwardRefusesDropoutAndBiasGradients) {
  BackwardArgs a(4, 4);
  attn::dist::DistOptions opt;
  opt.dropout.p = 0.1;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention_backward(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(),
                                            a.out.cview(), a.lse_view(), a.dout.cview(), a.dq.view,
                                            a.dk.view, a.dv.view, attn::no_mask(),
                                            attn::no_score_mod(), opt);
      },
      "options.dropout.p is 0.1");
  const index_t L = 4 * ranks_();
  std::vector<float> bias(static_cast<std::size_t>(L * L)), dbias(bias.size());
  const attn::TensorView<const float, 4> bv(bias.data(), {1, 1, L, L});
  const attn::TensorView<float, 4> dbv(dbias.data(), {1, 1, L, L});
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention_backward(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(),
                                            a.out.cview(), a.lse_view(), a.dout.cview(), a.dq.view,
                                            a.dk.view, a.dv.view, attn::no_mask(),
                                            attn::additive_bias(bv, dbv));
      },
      "gradient output (dbias)");
  EXPECT_TRUE(a.untouched());
}

TEST(DistErrors, ForwardRefusesDropout) {
  BackwardArgs a(4, 4);
  attn::dist::DistOptions opt;
  opt.dropout.p = 0.25;
  expect_fails_everywhere(
      [&] {
        attn::dist::ring_attention(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(), a.dq.view,
                                   attn::causal(), attn::no_score_mod(), opt);
      },
      "ring_attention: options.dropout.p is 0.25");
  expect_fails_everywhere(
      [&] {
        attn::dist::ulysses_attention(MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(),
                                      a.dq.view, attn::causal(), attn::no_score_mod(), opt);
      },
      "ulysses_attention: options.dropout.p is 0.25");
  EXPECT_TRUE(a.untouched());
}

TEST(DistErrors, UlyssesBackwardNeedsHeadsDividingByRanks) {
  if (ranks_() <= 2) GTEST_SKIP() << "two heads divide by 1 and 2 ranks";
  BackwardArgs a(4, 4);
  expect_fails_everywhere(
      [&] {
        attn::dist::ulysses_attention_backward(
            MPI_COMM_WORLD, a.q.cview(), a.k.cview(), a.v.cview(), a.out.cview(), a.lse_view(),
            a.dout.cview(), a.dq.view, a.dk.view, a.dv.view, attn::causal());
      },
      "q has 2 heads and k has 2; both must divide by the " + std::to_string(ranks_()) + " ranks");
  EXPECT_TRUE(a.untouched());
}

TEST(Shard, UnshardInvertsShard) {
  const int p = ranks_();
  for (SeqLayout layout : {SeqLayout::contiguous, SeqLayout::zigzag}) {
    const index_t n = 2 * p * 3;
    auto full = attn_test::random_tensor<float>(2, 3, n, 5, 3);
    Tensor<float> back(2, 3, n, 5);
    for (int r = 0; r < p; ++r) {
      Tensor<float> part(2, 3, attn::dist::shard_length(n, r, p, layout), 5);
      attn::dist::shard(full.view, part.view, r, p, layout);
      attn::dist::unshard(part.view, back.view, r, p, layout);
    }
    EXPECT_EQ(back.buf, full.buf);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank_() != 0) GTEST_FLAG_SET(brief, true);  // failures only, from the other ranks
  int rc = RUN_ALL_TESTS();
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
