// attn/dist/ring.hpp — ring attention across MPI ranks.
//
// Each of p ranks holds a slice of the sequence: its queries, keys and
// values. The key/value slices travel around the ring: at step t rank r
// attends its queries to the slice of rank (r − t) mod p, while the slice it
// will need at step t + 1 is already on its way (MPI_Isend to r + 1,
// MPI_Irecv from r − 1, two buffers). Each step's result is a partial
// attention over a disjoint key set, merged into the running result by its
// log-sum-exp:
//
//   lse' = logaddexp(lse, lse_t);  out' = out·exp(lse − lse') + out_t·exp(lse_t − lse')
//
// Masks and score modifiers are bound to the whole sequence, and every block
// is computed at its global positions, so causal, window, ALiBi, key padding
// and explicit masks give the one-process result. A block whose keys the mask
// rules out for every query is not computed; when the last steps of the ring
// are all such blocks on every rank (a causal window shorter than the ring),
// the ring stops early and those slices are never sent.
//
// Not included by attn/attn.hpp: link the CMake target attn::mpi.
#pragma once

#include "attn/dist/common.hpp"
#include "attn/dist/shard.hpp"
#include "attn/masked.hpp"
#include "attn/ops/merge.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <tuple>
#include <vector>

namespace attn {
namespace dist {
namespace detail {

/// Rows [begin, begin + len) of dimension 2 of a view.
template <class T, int R>
TensorView<T, R> seq_rows(const TensorView<T, R>& t, index_t begin, index_t len) {
  auto shape = t.shape();
  shape[2] = len;
  return TensorView<T, R>(t.data() + begin * t.stride(2), shape, t.strides());
}

/// The work of one ring step on this rank: local query rows × local rows of
/// the visiting key slice, with their global positions.
struct Block {
  index_t q_row = 0, q_len = 0, q_pos = 0;
  index_t k_row = 0, k_len = 0, k_pos = 0;
};

/// What every rank knows about the sequence: each rank's query and key runs
/// (global positions, local order), the global lengths, and which blocks the
/// mask leaves anything in.
struct RingPlan {
  std::vector<std::vector<Chunk>> q_chunks, k_chunks;   // per rank
  std::vector<index_t> k_len;                           // per rank, local key length
  index_t lq = 0, lk = 0;                               // global lengths
  int steps = 1;                                        // ring steps run
  std::uint64_t fingerprint = 14695981039346656037ULL;  // of every rank's live blocks
  std::vector<std::vector<Block>> work;                 // this rank's blocks per step
};

/// Builds the plan from every rank's lengths (identical on every rank). A
/// block is kept when the mask keeps anything in it for some batch and head.
template <class Mask>
RingPlan plan_ring(const std::vector<Descriptor>& all, SeqLayout layout, int me, const Mask& mask,
                   index_t batch, index_t q_heads) {
  const int p = static_cast<int>(all.size());
  RingPlan plan;
  std::vector<index_t> q_begin(all.size()), k_begin(all.size());
  for (int r = 0; r < p; ++r) {
    q_begin[static_cast<std::size_t>(r)] = plan.lq;
    k_begin[static_cast<std::size_t>(r)] = plan.lk;
    plan.lq += all[static_cast<std::size_t>(r)].f[Descriptor::lq];
    plan.lk += all[static_cast<std::size_t>(r)].f[Descriptor::lk];
  }
  for (int r = 0; r < p; ++r) {
    const auto& d = all[static_cast<std::size_t>(r)];
    plan.q_chunks.push_back(
        runs_of(layout, plan.lq, q_begin[static_cast<std::size_t>(r)], d.f[Descriptor::lq], r, p));
    plan.k_chunks.push_back(
        runs_of(layout, plan.lk, k_begin[static_cast<std::size_t>(r)], d.f[Descriptor::lk], r, p));
    plan.k_len.push_back(d.f[Descriptor::lk]);
  }
  auto live = [&](const Chunk& qc, const Chunk& kc) {
    if (qc.length == 0 || kc.length == 0) return false;
    for (index_t b = 0; b < batch; ++b)
      for (index_t h = 0; h < q_heads; ++h)
        if (mask.classify(b, h, qc.begin, qc.begin + qc.length, kc.begin, kc.begin + kc.length) !=
            TileKind::empty)
          return true;
    return false;
  };
  // Steps: one more than the farthest ring distance at which any rank has a live block.
  int last = 0;
  plan.work.assign(static_cast<std::size_t>(p), {});
  for (int r = 0; r < p; ++r)
    for (int t = 0; t < p; ++t) {
      const int s = (r - t + p) % p;
      index_t q_row = 0;
      for (const Chunk& qc : plan.q_chunks[static_cast<std::size_t>(r)]) {
        index_t k_row = 0;
        for (const Chunk& kc : plan.k_chunks[static_cast<std::size_t>(s)]) {
          if (live(qc, kc)) {
            last = std::max(last, t);
            // FNV-1a over (rank, step, query run, key run): equal plans, equal fingerprints
            for (const index_t x : {index_t{r}, index_t{t}, qc.begin, kc.begin})
              plan.fingerprint =
                  (plan.fingerprint ^ static_cast<std::uint64_t>(x)) * 1099511628211ULL;
            if (r == me)
              plan.work[static_cast<std::size_t>(t)].push_back(
                  Block{q_row, qc.length, qc.begin, k_row, kc.length, kc.begin});
          }
          k_row += kc.length;
        }
        q_row += qc.length;
      }
    }
  plan.steps = last + 1;
  plan.fingerprint ^= static_cast<std::uint64_t>(plan.steps);
  plan.work.resize(static_cast<std::size_t>(plan.steps));
  return plan;
}

/// The zigzag layout needs every rank to hold two equal chunks of 2p.
inline void check_ring_layout(const std::vector<Descriptor>& all, SeqLayout layout,
                              const AttentionShape& global, const char* fn) {
  if (layout != SeqLayout::zigzag) return;
  const int p = static_cast<int>(all.size());
  for (int r = 0; r < p; ++r) {
    const auto& d = all[static_cast<std::size_t>(r)];
    for (auto [len, total, name] :
         {std::tuple<index_t, index_t, const char*>{d.f[Descriptor::lq], global.lq, "q"},
          {d.f[Descriptor::lk], global.lk, "k"}})
      if (len * p != total || total % (2 * p) != 0)
        attn::detail::fail(fn, ": the zigzag layout needs every rank to hold 2 of ", 2 * p,
                           " equal chunks, but ", name, " has length ", len, " on rank ", r,
                           " of a sequence of ", total, " (it must divide by ", 2 * p,
                           "); use shard() to split it");
  }
}

inline double now() { return MPI_Wtime(); }

/// Two buffers for the K/V slices that travel the ring: K [B, Hkv, len, D]
/// then V [B, Hkv, len, Dv], each in its storage type, V 64-byte aligned.
template <class KS, class VS>
struct SliceBuffers {
  index_t B = 0, Hkv = 0, D = 0, Dv = 0;
  std::vector<double> storage[2];  // double elements: aligned for every storage type

  /// Bytes of the K part of a slice of `len` keys, rounded up so that V is aligned.
  index_t k_bytes(index_t len) const {
    return (len * B * Hkv * D * static_cast<index_t>(sizeof(KS)) + 63) / 64 * 64;
  }
  /// Bytes of a slice of `len` keys (one message).
  index_t bytes(index_t len) const {
    return k_bytes(len) + len * B * Hkv * Dv * static_cast<index_t>(sizeof(VS));
  }
  void allocate(index_t max_len) {
    for (auto& s : storage) s.resize(static_cast<std::size_t>((bytes(max_len) + 7) / 8));
  }
  void* data(int buf) { return storage[buf].data(); }
  Tensor4<KS> k(int buf, index_t len) {
    return bhsd(reinterpret_cast<KS*>(storage[buf].data()), B, Hkv, len, D);
  }
  Tensor4<VS> v(int buf, index_t len) {
    return bhsd(
        reinterpret_cast<VS*>(reinterpret_cast<unsigned char*>(storage[buf].data()) + k_bytes(len)),
        B, Hkv, len, Dv);
  }
  /// This rank's own slice into buffer 0, for its first trip.
  template <class K, class V>
  void load(const TensorView<K, 4>& k_in, const TensorView<V, 4>& v_in, index_t len) {
    const auto kb = k(0, len);
    const auto vb = v(0, len);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hkv; ++h)
        for (index_t j = 0; j < len; ++j) {
          for (index_t c = 0; c < D; ++c) kb(b, h, j, c) = k_in(b, h, j, c);
          for (index_t c = 0; c < Dv; ++c) vb(b, h, j, c) = v_in(b, h, j, c);
        }
  }
};

/// Options of one step's engine call: the caller's scale (or 1/sqrt(D)),
/// threads and tiles; stats into `stats` when the caller asked for them.
inline AttentionOptions step_options(const DistOptions& options, index_t D, AttentionStats* stats) {
  AttentionOptions o;
  o.scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  o.num_threads = options.num_threads;
  o.block_q = options.block_q;
  o.block_k = options.block_k;
  if (options.stats) o.stats = stats;
  return o;
}

}  // namespace detail

/// Ring attention over the ranks of `comm` (collective: every rank calls it).
///
/// Rank r passes its slice of the sequence: q [B, Hq, Lq_r, D], k [B, Hkv,
/// Lk_r, D], v [B, Hkv, Lk_r, Dv], and receives its slice of the result in
/// out [B, Hq, Lq_r, Dv] (and options.lse [B, Hq, Lq_r]). With the contiguous
/// layout the slices are runs in rank order of any nonzero lengths; with
/// zigzag every rank holds two chunks of N/(2p) (attn/dist/shard.hpp). The
/// mask and score modifier describe the whole problem (Lq = ΣLq_r, Lk = ΣLk_r;
/// bool_mask / additive_bias views are [.., Lq, Lk]) and must be the same on
/// every rank. Only the KV heads travel (GQA), in their storage type (bf16
/// and half travel at 2 bytes). Each rank runs options.num_threads threads.
///
/// Arguments are checked on every rank and the checks agree: if any rank's
/// arguments are wrong, or differ from rank 0's, every rank throws the same
/// attn::Error before anything is sent or written.
template <class Q, class K, class V, class O, class Mask = NoMask, class Mod = NoScoreMod>
void ring_attention(MPI_Comm comm, const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                    const TensorView<V, 4>& v, const TensorView<O, 4>& out, const Mask& mask = {},
                    const Mod& score_mod = {}, const DistOptions& options = {}) {
  using namespace dist::detail;
  static_checks<Q, K, V, O, Mask, Mod>();
  using Acc = dist_accum_t<Q, K, V, O>;
  using KS = std::remove_cv_t<K>;
  using VS = std::remove_cv_t<V>;
  const double t_start = now();
  const int me = comm_rank(comm), p = comm_size(comm);

  // ---- checks, agreed by every rank
  AttentionShape local;
  agree(comm, "ring_attention", [&] {
    local = attn::detail::check_attention(q, k, v, out, options);
    check_no_positions(options, "ring_attention");
    check_no_dropout(options, "ring_attention");
  });
  const std::vector<Descriptor> all = allgather(comm, describe(q, k, v, out, local, options));
  AttentionShape global = local;
  Mask bound_mask;
  RingPlan plan;
  std::int64_t fingerprint = 0;
  agree(
      comm, "ring_attention",
      [&] {
        check_same_everywhere(all);
        global.lq = global.lk = 0;
        for (const auto& d : all) {
          global.lq += d.f[Descriptor::lq];
          global.lk += d.f[Descriptor::lk];
        }
        check_ring_layout(all, options.layout, global, "ring_attention");
        bound_mask = mask.bind(global);
        const Mod bound_mod = score_mod.bind(global);
        attn::detail::check_policy_views(bound_mask, out, options.lse);
        attn::detail::check_policy_views(bound_mod, out, options.lse);
        plan = plan_ring(all, options.layout, me, bound_mask, global.batch, global.q_heads);
        fingerprint = static_cast<std::int64_t>(plan.fingerprint);
        const index_t max_lk = *std::max_element(plan.k_len.begin(), plan.k_len.end());
        message_count(max_lk * global.batch * global.kv_heads *
                              (global.d * static_cast<index_t>(sizeof(KS)) +
                               global.dv * static_cast<index_t>(sizeof(VS))) +
                          64,
                      "ring_attention: a key/value slice");
      },
      &fingerprint, "the set of blocks the mask leaves (its fingerprint)");

  // ---- buffers: two for travelling slices, the running result, one step's partial
  const index_t B = global.batch, Hq = global.q_heads, Hkv = global.kv_heads;
  const index_t D = global.d, Dv = global.dv, lq = local.lq;
  const index_t max_lk = *std::max_element(plan.k_len.begin(), plan.k_len.end());
  const bool travels = plan.steps > 1;
  SliceBuffers<KS, VS> slices{B, Hkv, D, Dv, {}};
  if (travels) slices.allocate(max_lk);
  std::vector<Acc> acc_out(static_cast<std::size_t>(B * Hq * lq * Dv), Acc(0));
  std::vector<Acc> part_out(acc_out.size());
  std::vector<Acc> acc_lse(static_cast<std::size_t>(B * Hq * lq),
                           -std::numeric_limits<Acc>::infinity());
  std::vector<Acc> part_lse(acc_lse.size());
  const auto acc_o = bhsd(acc_out.data(), B, Hq, lq, Dv);
  const auto part_o = bhsd(part_out.data(), B, Hq, lq, Dv);
  const TensorView<Acc, 3> acc_l(acc_lse.data(), {B, Hq, lq});
  const TensorView<Acc, 3> part_l(part_lse.data(), {B, Hq, lq});

  if (travels) slices.load(k, v, local.lk);  // this rank's slice, for its first trip

  AttentionStats step_stats, total_stats;
  AttentionOptions step_opt = step_options(options, D, &step_stats);
  RingTimings timings;
  timings.steps = plan.steps;

  // Query rows per engine call: small enough that MPI progresses the transfer
  // (MPI_Testall between calls) long before the step's compute ends.
  // Two query tiles at least, so that each call keeps every thread busy.
  const index_t tile_q = options.block_q > 0 ? options.block_q : 128;
  const index_t piece = std::max<index_t>(2 * tile_q, (lq + 3) / 4);
  const int right = (me + 1) % p, left = (me - 1 + p) % p;

  for (int t = 0; t < plan.steps; ++t) {
    const int cur = t % 2, nxt = 1 - cur;
    const int src = (me - t + p) % p;  // whose keys are here now
    MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    if (t + 1 < plan.steps) {
      const int incoming = (me - t - 1 + p) % p;
      MPI_Irecv(slices.data(nxt),
                static_cast<int>(slices.bytes(plan.k_len[static_cast<std::size_t>(incoming)])),
                MPI_BYTE, left, t, comm, &reqs[0]);
      const index_t bytes = slices.bytes(plan.k_len[static_cast<std::size_t>(src)]);
      MPI_Isend(slices.data(cur), static_cast<int>(bytes), MPI_BYTE, right, t, comm, &reqs[1]);
      timings.bytes_sent += bytes;
    }
    const double t0 = now();
    const std::clock_t c0 = std::clock();
    const index_t src_len = plan.k_len[static_cast<std::size_t>(src)];
    const auto& blocks = plan.work[static_cast<std::size_t>(t)];
    if (!blocks.empty()) ++timings.computed_steps;
    for (const Block& blk : blocks) {
      TensorView<const KS, 4> kk = t == 0 ? TensorView<const KS, 4>(k) : slices.k(cur, src_len);
      TensorView<const VS, 4> vv = t == 0 ? TensorView<const VS, 4>(v) : slices.v(cur, src_len);
      kk = seq_rows(kk, blk.k_row, blk.k_len);
      vv = seq_rows(vv, blk.k_row, blk.k_len);
      for (index_t r0 = 0; r0 < blk.q_len; r0 += piece) {
        const index_t rows = std::min(piece, blk.q_len - r0);
        const index_t row = blk.q_row + r0;
        // This piece's queries and the slice's keys at their places in the whole sequence.
        step_opt.positions = Positions{blk.q_pos + r0, blk.k_pos, global.lq, global.lk};
        step_opt.lse = seq_rows(part_l, row, rows);
        masked_attention(seq_rows(q, row, rows), kk, vv, seq_rows(part_o, row, rows), mask,
                         score_mod, step_opt);
        merge_partials(seq_rows(acc_o, row, rows), seq_rows(acc_l, row, rows),
                       TensorView<const Acc, 4>(seq_rows(part_o, row, rows)),
                       TensorView<const Acc, 3>(seq_rows(part_l, row, rows)), options.num_threads);
        if (options.stats) total_stats.add(step_stats);
        int done = 0;
        MPI_Testall(2, reqs, &done, MPI_STATUSES_IGNORE);
      }
    }
    const double t1 = now();
    timings.compute_cpu += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);
    timings.compute += t1 - t0;
    timings.exposed_comm += now() - t1;
  }

  // ---- this rank's result
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hq; ++h)
      for (index_t i = 0; i < lq; ++i) {
        for (index_t c = 0; c < Dv; ++c) out(b, h, i, c) = static_cast<O>(acc_o(b, h, i, c));
        if (!options.lse.is_null()) options.lse.set(b, h, i, acc_l(b, h, i));
      }
  if (options.stats) *options.stats = total_stats;
  timings.total = now() - t_start;
  if (options.timings) *options.timings = timings;
}

}  // namespace dist
}  // namespace attn

// The gradients (ring_attention_backward) come with the forward. Included last: it
// builds on this header.
#include "attn/dist/ring_backward.hpp"
