// attn/dist/ulysses_backward.hpp — the backward pass of all-to-all sequence
// parallelism (DeepSpeed-Ulysses).
//
// The forward's exchange, run on everything the backward reads: q, k, v,
// out, dout and lse go from "every head, this rank's rows" to "Hq/p query
// heads (Hkv/p KV heads), every row" in one MPI_Alltoallv each; each rank
// runs the one-process attention_backward on its heads; dq, dk, dv go back
// to sequence slices. No sum crosses ranks (a rank owns whole heads, and a
// GQA group's query heads live with their KV head), so the gradients are
// those of one process on the same heads, bitwise.
//
// Not included by attn/attn.hpp: link the CMake target attn::mpi.
#pragma once

#include "attn/dist/common.hpp"
#include "attn/dist/ulysses.hpp"
#include "attn/ops/backward.hpp"

#include <mpi.h>

#include <ctime>
#include <type_traits>
#include <vector>

namespace attn {
namespace dist {

/// Gradients of ulysses_attention (collective: every rank calls it).
/// Arguments as in ring_attention_backward (attn/dist/ring_backward.hpp):
/// this rank's slices of q, k, v, of the forward's out and lse and of dout;
/// it writes this rank's slices of dq, dk, dv. Hq and Hkv must divide by the
/// number of ranks. Each rank holds the whole sequence of its Hq/p query
/// heads and Hkv/p KV heads during the call (q, out, dout, dq and k, v, dk,
/// dv of those heads). Checks agree across ranks as in the ring.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask = NoMask, class Mod = NoScoreMod>
void ulysses_attention_backward(MPI_Comm comm, const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                                const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                                const TensorView<L, 3>& lse, const TensorView<DO, 4>& dout,
                                const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                                const TensorView<DV, 4>& dv, const Mask& mask = {},
                                const Mod& score_mod = {}, const DistOptions& options = {}) {
  using namespace dist::detail;
  static_backward_checks<Q, K, V, O, L, DO, DQ, DK, DV, Mask, Mod>();
  using QS = std::remove_cv_t<Q>;
  using KS = std::remove_cv_t<K>;
  using VS = std::remove_cv_t<V>;
  using OS = std::remove_cv_t<O>;
  using LS = std::remove_cv_t<L>;
  using DOS = std::remove_cv_t<DO>;
  const char* fn = "ulysses_attention_backward";
  const double t_start = MPI_Wtime();
  const int me = comm_rank(comm), p = comm_size(comm);

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
  Mod bound_mod;
  AllToAllLayout lay;
  agree(comm, fn, [&] {
    check_same_everywhere(all);
    check_grad_types(types);
    lay = all_to_all_layout(all, local, options.layout, p, fn, "ring_attention_backward", global);
    bound_mask = mask.bind(global);
    bound_mod = score_mod.bind(global);
    check_no_bias_grad(bound_mod, fn);
    AttentionOptions local_opt = options;
    local_opt.lse = {};
    attn::detail::check_backward(q, k, v, out, lse, dout, dq, dk, dv, bound_mask, bound_mod,
                                 local_opt);
  });

  const index_t B = global.batch, hq = global.q_heads / p, hkv = global.kv_heads / p;
  const index_t N = global.lq, M = global.lk, D = global.d, Dv = global.dv;
  std::vector<QS> qf(static_cast<std::size_t>(B * hq * N * D));
  std::vector<KS> kf(static_cast<std::size_t>(B * hkv * M * D));
  std::vector<VS> vf(static_cast<std::size_t>(B * hkv * M * Dv));
  std::vector<OS> of(static_cast<std::size_t>(B * hq * N * Dv));
  std::vector<DOS> dof(of.size());
  std::vector<LS> lf(static_cast<std::size_t>(B * hq * N));
  std::vector<DQ> dqf(qf.size());
  std::vector<DK> dkf(kf.size());
  std::vector<DV> dvf(vf.size());
  const auto qv = bhsd(qf.data(), B, hq, N, D);
  const auto kv = bhsd(kf.data(), B, hkv, M, D);
  const auto vv = bhsd(vf.data(), B, hkv, M, Dv);
  const auto ov = bhsd(of.data(), B, hq, N, Dv);
  const auto dov = bhsd(dof.data(), B, hq, N, Dv);
  const TensorView<LS, 3> lv(lf.data(), {B, hq, N});
  const auto dqv = bhsd(dqf.data(), B, hq, N, D);
  const auto dkv = bhsd(dkf.data(), B, hkv, M, D);
  const auto dvv = bhsd(dvf.data(), B, hkv, M, Dv);

  const double t0 = MPI_Wtime();
  seq_to_heads(comm, q, qv, lay.q_runs, lay.q_lens);
  seq_to_heads(comm, k, kv, lay.k_runs, lay.k_lens);
  seq_to_heads(comm, v, vv, lay.k_runs, lay.k_lens);
  seq_to_heads(comm, out, ov, lay.q_runs, lay.q_lens);
  seq_to_heads(comm, dout, dov, lay.q_runs, lay.q_lens);
  seq_to_heads(comm, as_rank4(lse), as_rank4(lv), lay.q_runs, lay.q_lens);
  const double t1 = MPI_Wtime();
  const std::clock_t c1 = std::clock();

  AttentionOptions opt;
  opt.scale = options.scale;
  opt.num_threads = options.num_threads;
  opt.block_q = options.block_q;
  opt.block_k = options.block_k;
  opt.stats = options.stats;
  attention_backward(
      TensorView<const QS, 4>(qv), TensorView<const KS, 4>(kv), TensorView<const VS, 4>(vv),
      TensorView<const OS, 4>(ov), TensorView<const LS, 3>(lv), TensorView<const DOS, 4>(dov), dqv,
      dkv, dvv, head_shifted_mask(bound_mask, me * hq), head_shifted_mod(bound_mod, me * hq), opt);
  const double t2 = MPI_Wtime();
  const double cpu = static_cast<double>(std::clock() - c1) / CLOCKS_PER_SEC;

  heads_to_seq(comm, TensorView<const DQ, 4>(dqv), dq, lay.q_runs, lay.q_lens);
  heads_to_seq(comm, TensorView<const DK, 4>(dkv), dk, lay.k_runs, lay.k_lens);
  heads_to_seq(comm, TensorView<const DV, 4>(dvv), dv, lay.k_runs, lay.k_lens);
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
