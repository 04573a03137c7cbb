// attn/dist/ring_backward.hpp — the backward pass of ring attention across
// MPI ranks.
//
// Each rank keeps its queries and their gradient dQ at home. The key/value
// slices travel around the ring as in the forward (attn/dist/ring.hpp), and
// each slice carries its gradient accumulators dK, dV with it: at step t rank
// r holds the K/V slice of rank s = (r − t) mod p, computes the gradients of
// its query rows against it with the one-process attention_backward (global
// positions; the GLOBAL out and lse of the forward, so P = exp(S − lse) and
// Δ_i = rowsum(dO_i ∘ O_i) are exact), adds dQ into its own accumulator, adds
// dK, dV into the slice's accumulators and passes them on. After the last
// step each accumulator is sent back to its owner.
//
//   K, V of step t + 1 are received while step t computes (two buffers);
//   the dK, dV accumulators of step t leave after step t's compute and the
//   accumulators of step t + 1 arrive during step t + 1's compute.
//
// Accumulators are fp32 (fp64 if an operand is double); every sum runs in a
// fixed order (ring order, then query pieces in order), so the result is
// bitwise identical for any thread count and on repeated runs.
//
// Not included by attn/attn.hpp: link the CMake target attn::mpi.
#pragma once

#include "attn/dist/common.hpp"
#include "attn/dist/ring.hpp"
#include "attn/ops/backward.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <type_traits>
#include <vector>

namespace attn {
namespace dist {
namespace detail {

/// dst rows [row, row + src rows) += src (dimension 2), both [B, H, *, D].
template <class Acc>
void add_rows(const TensorView<Acc, 4>& dst, index_t row, const TensorView<const Acc, 4>& src) {
  for (index_t b = 0; b < src.extent(0); ++b)
    for (index_t h = 0; h < src.extent(1); ++h)
      for (index_t i = 0; i < src.extent(2); ++i) {
        Acc* d = &dst(b, h, row + i, 0);
        const Acc* s = &src(b, h, i, 0);
        for (index_t c = 0; c < src.extent(3); ++c) d[c] += s[c];
      }
}

}  // namespace detail

/// Gradients of ring_attention (collective: every rank calls it).
///
/// Rank r passes the slices it passed to ring_attention — q [B, Hq, Lq_r, D],
/// k [B, Hkv, Lk_r, D], v [B, Hkv, Lk_r, Dv] — with what the forward wrote:
/// out [B, Hq, Lq_r, Dv] and lse [B, Hq, Lq_r] (options.lse of the forward;
/// float, or double), and the loss gradient dout like out. It receives the
/// gradients of its own slices: dq like q, dk like k, dv like v (with GQA, dk
/// and dv sum over the query heads of a group). The mask, score modifier,
/// scale, layout and tiles must be those of the forward and the same on every
/// rank. Dropout and modifiers with a gradient output (additive_bias with
/// dbias) are refused.
///
/// Arguments are checked on every rank and the checks agree: if any rank's
/// arguments are wrong (shapes, an output that overlaps an input), or differ
/// from rank 0's, every rank throws the same attn::Error before anything is
/// sent or written.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask = NoMask, class Mod = NoScoreMod>
void ring_attention_backward(MPI_Comm comm, const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                             const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                             const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                             const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                             const TensorView<DV, 4>& dv, const Mask& mask = {},
                             const Mod& score_mod = {}, const DistOptions& options = {}) {
  using namespace dist::detail;
  static_backward_checks<Q, K, V, O, L, DO, DQ, DK, DV, Mask, Mod>();
  using Acc = dist_accum_t<Q, K, V, O, DO, DQ, DK, DV>;
  using KS = std::remove_cv_t<K>;
  using VS = std::remove_cv_t<V>;
  const char* fn = "ring_attention_backward";
  const double t_start = now();
  const int me = comm_rank(comm), p = comm_size(comm);

  // ---- checks, agreed by every rank
  AttentionShape local;
  agree(comm, fn, [&] {
    AttentionOptions probe = options;
    probe.lse = {};
    local = attn::detail::check_attention(q, k, v, out, probe);
    check_backward_options(options, fn);
  });
  DistOptions desc_opt = options;
  desc_opt.lse = {};  // lse is an input here, always given
  const std::vector<Descriptor> all = allgather(comm, describe(q, k, v, out, local, desc_opt));
  const std::vector<std::int64_t> types = gather_grad_types<L, DO, DQ, DK, DV>(comm);
  AttentionShape global = local;
  Mask bound_mask;
  RingPlan plan;
  std::int64_t fingerprint = 0;
  agree(
      comm, fn,
      [&] {
        check_same_everywhere(all);
        check_grad_types(types);
        global.lq = global.lk = 0;
        for (const auto& d : all) {
          global.lq += d.f[Descriptor::lq];
          global.lk += d.f[Descriptor::lk];
        }
        check_ring_layout(all, options.layout, global, fn);
        bound_mask = mask.bind(global);
        const Mod bound_mod = score_mod.bind(global);
        check_no_bias_grad(bound_mod, fn);
        AttentionOptions local_opt = options;
        local_opt.lse = {};
        attn::detail::check_backward(q, k, v, out, lse, dout, dq, dk, dv, bound_mask, bound_mod,
                                     local_opt);
        plan = plan_ring(all, options.layout, me, bound_mask, global.batch, global.q_heads);
        fingerprint = static_cast<std::int64_t>(plan.fingerprint);
        const index_t max_lk = *std::max_element(plan.k_len.begin(), plan.k_len.end());
        message_count(max_lk * global.batch * global.kv_heads *
                              (global.d * static_cast<index_t>(sizeof(KS)) +
                               global.dv * static_cast<index_t>(sizeof(VS))) +
                          64,
                      "ring_attention_backward: a key/value slice");
        message_count(max_lk * global.batch * global.kv_heads * (global.d + global.dv) *
                          static_cast<index_t>(sizeof(Acc)),
                      "ring_attention_backward: a slice's dk/dv accumulator");
      },
      &fingerprint, "the set of blocks the mask leaves (its fingerprint)");

  // ---- buffers: two for travelling K/V, two for travelling dK/dV, this
  // step's dK/dV, dQ, one engine call's gradients
  const index_t B = global.batch, Hq = global.q_heads, Hkv = global.kv_heads;
  const index_t D = global.d, Dv = global.dv, lq = local.lq;
  auto grad_count = [&](index_t len) { return len * B * Hkv * (D + Dv); };  // Acc elements
  const index_t max_lk = *std::max_element(plan.k_len.begin(), plan.k_len.end());
  const bool travels = plan.steps > 1;
  SliceBuffers<KS, VS> slices{B, Hkv, D, Dv, {}};
  std::vector<Acc> grads[2];  // travelling dK, dV accumulators
  if (travels) {
    slices.allocate(max_lk);
    for (auto& g : grads) g.resize(static_cast<std::size_t>(grad_count(max_lk)));
  } else {
    grads[0].resize(static_cast<std::size_t>(grad_count(local.lk)));
  }
  auto dk_of = [&](Acc* base, index_t len) { return bhsd(base, B, Hkv, len, D); };
  auto dv_of = [&](Acc* base, index_t len) {
    return bhsd(base + len * B * Hkv * D, B, Hkv, len, Dv);
  };

  const index_t tile_q = options.block_q > 0 ? options.block_q : 128;
  const index_t piece = std::min(lq, std::max<index_t>(2 * tile_q, (lq + 3) / 4));
  std::vector<Acc> dq_acc(static_cast<std::size_t>(B * Hq * lq * D), Acc(0));
  std::vector<Acc> step_grads(static_cast<std::size_t>(grad_count(max_lk)));
  std::vector<Acc> dq_part(static_cast<std::size_t>(B * Hq * piece * D));
  std::vector<Acc> dkv_part(step_grads.size());
  const auto dq_a = bhsd(dq_acc.data(), B, Hq, lq, D);

  if (travels) slices.load(k, v, local.lk);  // this rank's slice, for its first trip

  AttentionStats step_stats, total_stats;
  AttentionOptions step_opt = step_options(options, D, &step_stats);
  RingTimings timings;
  timings.steps = plan.steps;
  const int right = (me + 1) % p, left = (me - 1 + p) % p;
  MPI_Request greqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};  // dK/dV in flight

  for (int t = 0; t < plan.steps; ++t) {
    const int cur = t % 2, nxt = 1 - cur;
    const int src = (me - t + p) % p;  // whose keys are here now
    const index_t src_len = plan.k_len[static_cast<std::size_t>(src)];
    MPI_Request reqs[4] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, greqs[0], greqs[1]};
    if (t + 1 < plan.steps) {
      const int incoming = (me - t - 1 + p) % p;
      MPI_Irecv(slices.data(nxt),
                static_cast<int>(slices.bytes(plan.k_len[static_cast<std::size_t>(incoming)])),
                MPI_BYTE, left, 2 * t, comm, &reqs[0]);
      const index_t bytes = slices.bytes(src_len);
      MPI_Isend(slices.data(cur), static_cast<int>(bytes), MPI_BYTE, right, 2 * t, comm, &reqs[1]);
      timings.bytes_sent += bytes;
    }
    const double t0 = now();
    const std::clock_t c0 = std::clock();
    // This step's dK, dV of the visiting slice, summed over its blocks and pieces in order.
    Acc* const sg = step_grads.data();
    std::fill_n(sg, grad_count(src_len), Acc(0));
    const auto& blocks = plan.work[static_cast<std::size_t>(t)];
    if (!blocks.empty()) ++timings.computed_steps;
    for (const Block& blk : blocks) {
      TensorView<const KS, 4> kk = t == 0 ? TensorView<const KS, 4>(k) : slices.k(cur, src_len);
      TensorView<const VS, 4> vv = t == 0 ? TensorView<const VS, 4>(v) : slices.v(cur, src_len);
      kk = seq_rows(kk, blk.k_row, blk.k_len);
      vv = seq_rows(vv, blk.k_row, blk.k_len);
      const auto dk_part = dk_of(dkv_part.data(), blk.k_len);
      const auto dv_part = dv_of(dkv_part.data(), blk.k_len);
      for (index_t r0 = 0; r0 < blk.q_len; r0 += piece) {
        const index_t rows = std::min(piece, blk.q_len - r0);
        const index_t row = blk.q_row + r0;
        const auto dq_p = bhsd(dq_part.data(), B, Hq, rows, D);
        // This piece's queries and the slice's keys at their places in the whole sequence.
        step_opt.positions = Positions{blk.q_pos + r0, blk.k_pos, global.lq, global.lk};
        attention_backward(seq_rows(q, row, rows), kk, vv, seq_rows(out, row, rows),
                           seq_rows(lse, row, rows), seq_rows(dout, row, rows), dq_p, dk_part,
                           dv_part, mask, score_mod, step_opt);
        add_rows(dq_a, row, TensorView<const Acc, 4>(dq_p));
        add_rows(dk_of(sg, src_len), blk.k_row, TensorView<const Acc, 4>(dk_part));
        add_rows(dv_of(sg, src_len), blk.k_row, TensorView<const Acc, 4>(dv_part));
        if (options.stats) total_stats.add(step_stats);
        int done = 0;
        MPI_Testall(4, reqs, &done, MPI_STATUSES_IGNORE);
      }
    }
    const double t1 = now();
    timings.compute_cpu += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    timings.compute += t1 - t0;
    // The slice's accumulators: what the ranks before this one added (received
    // during the compute), plus this step.
    Acc* acc = travels ? grads[cur].data() : grads[0].data();
    if (t == 0) {
      std::fill_n(acc, grad_count(src_len), Acc(0));
    } else {
      MPI_Waitall(2, reqs + 2, MPI_STATUSES_IGNORE);  // arrived; the previous one has left
    }
    for (index_t i = 0, n = grad_count(src_len); i < n; ++i) acc[i] += sg[i];
    greqs[0] = greqs[1] = MPI_REQUEST_NULL;
    if (t + 1 < plan.steps) {
      const int incoming = (me - t - 1 + p) % p;
      const index_t count = grad_count(plan.k_len[static_cast<std::size_t>(incoming)]);
      MPI_Irecv(grads[nxt].data(), message_count(count * static_cast<index_t>(sizeof(Acc)), fn),
                MPI_BYTE, left, 2 * t + 1, comm, &greqs[0]);
      const index_t bytes = grad_count(src_len) * static_cast<index_t>(sizeof(Acc));
      MPI_Isend(acc, static_cast<int>(bytes), MPI_BYTE, right, 2 * t + 1, comm, &greqs[1]);
      timings.bytes_sent += bytes;
    }
    MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);
    timings.exposed_comm += now() - t1;
  }

  // ---- every slice's accumulators home: the last holder sends them to the owner
  const Acc* own = grads[0].data();
  if (travels) {
    const double t1 = now();
    const int last = (plan.steps - 1) % 2;
    const int holder = (me + plan.steps - 1) % p;  // holds this rank's slice now
    const int owner = (me - plan.steps + 1 + p) % p;
    const index_t held = plan.k_len[static_cast<std::size_t>(owner)];
    MPI_Request home[2];
    MPI_Irecv(grads[1 - last].data(),
              static_cast<int>(grad_count(local.lk) * static_cast<index_t>(sizeof(Acc))), MPI_BYTE,
              holder, 2 * plan.steps, comm, &home[0]);
    const index_t bytes = grad_count(held) * static_cast<index_t>(sizeof(Acc));
    MPI_Isend(grads[last].data(), static_cast<int>(bytes), MPI_BYTE, owner, 2 * plan.steps, comm,
              &home[1]);
    timings.bytes_sent += bytes;
    MPI_Waitall(2, home, MPI_STATUSES_IGNORE);
    own = grads[1 - last].data();
    timings.exposed_comm += now() - t1;
  }

  // ---- this rank's gradients
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hq; ++h)
      for (index_t i = 0; i < lq; ++i)
        for (index_t c = 0; c < D; ++c) dq(b, h, i, c) = static_cast<DQ>(dq_a(b, h, i, c));
  const auto dk_own = bhsd(own, B, Hkv, local.lk, D);
  const auto dv_own = bhsd(own + local.lk * B * Hkv * D, B, Hkv, local.lk, Dv);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hkv; ++h)
      for (index_t j = 0; j < local.lk; ++j) {
        for (index_t c = 0; c < D; ++c) dk(b, h, j, c) = static_cast<DK>(dk_own(b, h, j, c));
        for (index_t c = 0; c < Dv; ++c) dv(b, h, j, c) = static_cast<DV>(dv_own(b, h, j, c));
      }
  if (options.stats) *options.stats = total_stats;
  timings.total = now() - t_start;
  if (options.timings) *options.timings = timings;
}

}  // namespace dist
}  // namespace attn
