// attn/dist/ulysses.hpp — all-to-all sequence parallelism (DeepSpeed-Ulysses).
//
// Each rank holds a slice of the sequence for every head. One all-to-all
// turns that into the whole sequence for Hq/p query heads (and Hkv/p KV
// heads); each rank then runs ordinary attention on its heads, and a second
// all-to-all turns the output back into sequence slices. Communication is
// three tensors in and one out per call, independent of the mask, but the
// head counts must divide by the number of ranks. See docs/distributed.md
// for when to choose it over ring attention.
//
// Not included by attn/attn.hpp: link the CMake target attn::mpi.
#pragma once

#include "attn/dist/common.hpp"
#include "attn/dist/shard.hpp"
#include "attn/masked.hpp"

#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <ctime>
#include <vector>

namespace attn {
namespace dist {
namespace detail {

/// Byte counts and displacements of one MPI_Alltoallv.
struct Exchange {
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  std::int64_t send_total = 0, recv_total = 0;
};

/// Counts for blocks of `bytes_per_row` per sequence row: this rank sends
/// `my_len` rows to every rank (send = true: sequence → heads) and receives
/// lens[i] from rank i, or the reverse.
inline Exchange exchange_counts(const std::vector<index_t>& lens, index_t my_len,
                                std::int64_t bytes_per_row, bool to_heads, const char* what) {
  Exchange x;
  const std::size_t p = lens.size();
  x.send_counts.resize(p);
  x.send_displs.resize(p);
  x.recv_counts.resize(p);
  x.recv_displs.resize(p);
  for (std::size_t i = 0; i < p; ++i) {
    const std::int64_t s = (to_heads ? my_len : lens[i]) * bytes_per_row;
    const std::int64_t r = (to_heads ? lens[i] : my_len) * bytes_per_row;
    x.send_displs[i] = message_count(x.send_total, what);
    x.recv_displs[i] = message_count(x.recv_total, what);
    x.send_counts[i] = message_count(s, what);
    x.recv_counts[i] = message_count(r, what);
    x.send_total += s;
    x.recv_total += r;
  }
  message_count(x.send_total, what);
  message_count(x.recv_total, what);
  return x;
}

/// Sequence slices of all heads → the whole sequence of this rank's heads.
/// x: [B, H, L_me, C] on this rank; full: [B, H/p, N, C], row = global position.
template <class T, class S>
void seq_to_heads(MPI_Comm comm, const TensorView<T, 4>& x, const TensorView<S, 4>& full,
                  const std::vector<std::vector<Chunk>>& runs, const std::vector<index_t>& lens) {
  const int p = static_cast<int>(lens.size());
  const index_t B = x.extent(0), hl = full.extent(1), C = x.extent(3), L = x.extent(2);
  const std::int64_t row_bytes = B * hl * C * static_cast<std::int64_t>(sizeof(S));
  const Exchange ex = exchange_counts(lens, L, row_bytes, true, "ulysses_attention: a block");
  std::vector<S> send(
      static_cast<std::size_t>(ex.send_total / static_cast<std::int64_t>(sizeof(S))));
  std::vector<S> recv(
      static_cast<std::size_t>(ex.recv_total / static_cast<std::int64_t>(sizeof(S))));
  for (int j = 0; j < p; ++j) {  // to rank j: heads [j·hl, (j+1)·hl) of my rows, [B, hl, L, C]
    S* dst = send.data() + ex.send_displs[static_cast<std::size_t>(j)] / sizeof(S);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < hl; ++h)
        for (index_t l = 0; l < L; ++l)
          for (index_t c = 0; c < C; ++c) *dst++ = static_cast<S>(x(b, j * hl + h, l, c));
  }
  MPI_Alltoallv(send.data(), ex.send_counts.data(), ex.send_displs.data(), MPI_BYTE, recv.data(),
                ex.recv_counts.data(), ex.recv_displs.data(), MPI_BYTE, comm);
  for (int i = 0; i < p;
       ++i) {  // from rank i: its rows, [B, hl, L_i, C], placed at their positions
    const S* src = recv.data() + ex.recv_displs[static_cast<std::size_t>(i)] / sizeof(S);
    const index_t li = lens[static_cast<std::size_t>(i)];
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < hl; ++h) {
        index_t l = 0;
        for (const Chunk& run : runs[static_cast<std::size_t>(i)])
          for (index_t r = 0; r < run.length; ++r, ++l)
            for (index_t c = 0; c < C; ++c)
              full(b, h, run.begin + r, c) = src[(b * hl + h) * li * C + l * C + c];
      }
  }
}

/// The inverse: the whole sequence of this rank's heads → this rank's
/// sequence slice of every head. full: [B, H/p, N, C]; x: [B, H, L_me, C].
template <class S, class T>
void heads_to_seq(MPI_Comm comm, const TensorView<const S, 4>& full, const TensorView<T, 4>& x,
                  const std::vector<std::vector<Chunk>>& runs, const std::vector<index_t>& lens) {
  const int p = static_cast<int>(lens.size());
  const index_t B = x.extent(0), hl = full.extent(1), C = x.extent(3), L = x.extent(2);
  const std::int64_t row_bytes = B * hl * C * static_cast<std::int64_t>(sizeof(S));
  const Exchange ex = exchange_counts(lens, L, row_bytes, false, "ulysses_attention: a block");
  std::vector<S> send(
      static_cast<std::size_t>(ex.send_total / static_cast<std::int64_t>(sizeof(S))));
  std::vector<S> recv(
      static_cast<std::size_t>(ex.recv_total / static_cast<std::int64_t>(sizeof(S))));
  for (int j = 0; j < p; ++j) {  // to rank j: its rows of my heads, [B, hl, L_j, C]
    S* dst = send.data() + ex.send_displs[static_cast<std::size_t>(j)] / sizeof(S);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < hl; ++h)
        for (const Chunk& run : runs[static_cast<std::size_t>(j)])
          for (index_t r = 0; r < run.length; ++r)
            for (index_t c = 0; c < C; ++c) *dst++ = full(b, h, run.begin + r, c);
  }
  MPI_Alltoallv(send.data(), ex.send_counts.data(), ex.send_displs.data(), MPI_BYTE, recv.data(),
                ex.recv_counts.data(), ex.recv_displs.data(), MPI_BYTE, comm);
  for (int i = 0; i < p; ++i) {  // from rank i: heads [i·hl, (i+1)·hl) of my rows
    const S* src = recv.data() + ex.recv_displs[static_cast<std::size_t>(i)] / sizeof(S);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < hl; ++h)
        for (index_t l = 0; l < L; ++l)
          for (index_t c = 0; c < C; ++c) x(b, i * hl + h, l, c) = static_cast<T>(*src++);
  }
}

/// A [B, H, L] view as [B, H, L, 1].
template <class T>
TensorView<T, 4> as_rank4(const TensorView<T, 3>& t) {
  return TensorView<T, 4>(t.data(), {t.extent(0), t.extent(1), t.extent(2), 1},
                          {t.stride(0), t.stride(1), t.stride(2), 1});
}

/// Where every rank's rows sit in the whole sequence, for the all-to-all:
/// each rank's lengths, the global lengths, and each rank's runs of global
/// rows. Fails (inside `agree`) when the heads do not divide by the ranks or
/// a zigzag slice is not N/p; `fn` and `ring` name the call and its ring
/// counterpart in the message.
struct AllToAllLayout {
  std::vector<std::vector<Chunk>> q_runs, k_runs;
  std::vector<index_t> q_lens, k_lens;
};
inline AllToAllLayout all_to_all_layout(const std::vector<Descriptor>& all,
                                        const AttentionShape& local, SeqLayout layout, int p,
                                        const char* fn, const char* ring, AttentionShape& global) {
  if (local.q_heads % p != 0 || local.kv_heads % p != 0)
    attn::detail::fail(fn, ": q has ", local.q_heads, " heads and k has ", local.kv_heads,
                       "; both must divide by the ", p, " ranks (", ring, " has no such limit)");
  AllToAllLayout a;
  global.lq = global.lk = 0;
  for (const auto& d : all) {
    a.q_lens.push_back(d.f[Descriptor::lq]);
    a.k_lens.push_back(d.f[Descriptor::lk]);
    global.lq += d.f[Descriptor::lq];
    global.lk += d.f[Descriptor::lk];
  }
  index_t qb = 0, kb = 0;
  for (int r = 0; r < p; ++r) {
    const auto& d = all[static_cast<std::size_t>(r)];
    if (layout == SeqLayout::zigzag &&
        (d.f[Descriptor::lq] * p != global.lq || d.f[Descriptor::lk] * p != global.lk))
      attn::detail::fail(fn, ": the zigzag layout needs every rank to hold N/", p,
                         " rows, but rank ", r, " holds ", d.f[Descriptor::lq], " of ", global.lq,
                         " queries and ", d.f[Descriptor::lk], " of ", global.lk, " keys");
    a.q_runs.push_back(runs_of(layout, global.lq, qb, d.f[Descriptor::lq], r, p));
    a.k_runs.push_back(runs_of(layout, global.lk, kb, d.f[Descriptor::lk], r, p));
    qb += d.f[Descriptor::lq];
    kb += d.f[Descriptor::lk];
  }
  return a;
}

}  // namespace detail

/// All-to-all sequence parallel attention over the ranks of `comm`
/// (collective). Arguments as in ring_attention: rank r holds its slice of
/// the sequence (contiguous runs of any lengths, or zigzag) for every head;
/// the mask and modifier describe the whole problem. Hq and Hkv must divide
/// by the number of ranks (use ring_attention otherwise). Each rank holds the
/// whole sequence of Hq/p query heads and Hkv/p KV heads during the call.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void ulysses_attention(MPI_Comm comm, const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                       const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                       const Mask& mask = {}, const Mod& score_mod = {},
                       const DistOptions& options = {}) {
  using namespace dist::detail;
  static_checks<Q, K, V, O, Mask, Mod>();
  using QS = std::remove_cv_t<Q>;
  using KS = std::remove_cv_t<K>;
  using VS = std::remove_cv_t<V>;
  const double t_start = MPI_Wtime();
  const int me = comm_rank(comm), p = comm_size(comm);

  AttentionShape local;
  agree(comm, "ulysses_attention", [&] {
    local = attn::detail::check_attention(q, k, v, out, options);
    check_no_positions(options, "ulysses_attention");
    check_no_dropout(options, "ulysses_attention");
  });
  const std::vector<Descriptor> all = allgather(comm, describe(q, k, v, out, local, options));
  AttentionShape global = local;
  Mask bound_mask;
  Mod bound_mod;
  AllToAllLayout lay;
  agree(comm, "ulysses_attention", [&] {
    check_same_everywhere(all);
    lay = all_to_all_layout(all, local, options.layout, p, "ulysses_attention", "ring_attention",
                            global);
    bound_mask = mask.bind(global);
    bound_mod = score_mod.bind(global);
    attn::detail::check_policy_views(bound_mask, out, options.lse);
    attn::detail::check_policy_views(bound_mod, out, options.lse);
  });

  const index_t B = global.batch, hq = global.q_heads / p, hkv = global.kv_heads / p;
  const index_t N = global.lq, M = global.lk, D = global.d, Dv = global.dv;
  std::vector<QS> qf(static_cast<std::size_t>(B * hq * N * D));
  std::vector<KS> kf(static_cast<std::size_t>(B * hkv * M * D));
  std::vector<VS> vf(static_cast<std::size_t>(B * hkv * M * Dv));
  std::vector<O> of(static_cast<std::size_t>(B * hq * N * Dv));
  // lse travels in double whatever the caller's lse is: exact for a float
  // call's values, and a double call keeps its rounding.
  std::vector<double> lf(options.lse.is_null() ? 0 : static_cast<std::size_t>(B * hq * N));
  const auto qv = bhsd(qf.data(), B, hq, N, D);
  const auto kv = bhsd(kf.data(), B, hkv, M, D);
  const auto vv = bhsd(vf.data(), B, hkv, M, Dv);
  const auto ov = bhsd(of.data(), B, hq, N, Dv);
  const TensorView<double, 3> lv(lf.data(), {B, hq, N});

  const double t0 = MPI_Wtime();
  seq_to_heads(comm, q, qv, lay.q_runs, lay.q_lens);
  seq_to_heads(comm, k, kv, lay.k_runs, lay.k_lens);
  seq_to_heads(comm, v, vv, lay.k_runs, lay.k_lens);
  const double t1 = MPI_Wtime();
  const std::clock_t c1 = std::clock();

  AttentionOptions opt;
  opt.scale = options.scale;
  opt.num_threads = options.num_threads;
  opt.block_q = options.block_q;
  opt.block_k = options.block_k;
  opt.stats = options.stats;
  if (!options.lse.is_null()) opt.lse = lv;
  masked_attention(TensorView<const QS, 4>(qv), TensorView<const KS, 4>(kv),
                   TensorView<const VS, 4>(vv), ov, head_shifted_mask(bound_mask, me * hq),
                   head_shifted_mod(bound_mod, me * hq), opt);
  const double t2 = MPI_Wtime();
  const double cpu = static_cast<double>(std::clock() - c1) / CLOCKS_PER_SEC;

  heads_to_seq(comm, TensorView<const O, 4>(ov), out, lay.q_runs, lay.q_lens);
  if (!options.lse.is_null()) {
    const LseView& user = options.lse;
    std::vector<double> mine(
        static_cast<std::size_t>(user.extent(0) * user.extent(1) * user.extent(2)));
    const TensorView<double, 3> mv(mine.data(), {user.extent(0), user.extent(1), user.extent(2)});
    heads_to_seq(comm, TensorView<const double, 4>(as_rank4(lv)), as_rank4(mv), lay.q_runs,
                 lay.q_lens);
    for (index_t b = 0; b < mv.extent(0); ++b)
      for (index_t h = 0; h < mv.extent(1); ++h)
        for (index_t i = 0; i < mv.extent(2); ++i) user.set(b, h, i, mv(b, h, i));
  }
  if (options.timings) {
    RingTimings tm;
    tm.steps = tm.computed_steps = 1;
    tm.compute = t2 - t1;
    tm.compute_cpu = cpu;
    tm.exposed_comm = (t1 - t0) + (MPI_Wtime() - t2);
    tm.total = MPI_Wtime() - t_start;
    *options.timings = tm;
  }
}

}  // namespace dist
}  // namespace attn

// The gradients (ulysses_attention_backward) come with the forward. Included last: it
// builds on this header.
#include "attn/dist/ulysses_backward.hpp"
