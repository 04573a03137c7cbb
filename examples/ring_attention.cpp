// ring_attention — causal attention over a sequence split across MPI ranks.
//
//   mpirun -np 4 build/main/examples/ring_attention
//
// Each rank holds 1/p of a 4096-token sequence in the zigzag layout (chunks r
// and 2p−1−r of 2p, so every rank does the same causal work; contiguous
// slices when 2p does not divide 4096), runs
// ring_attention with grouped-query heads, then ring_attention_backward (dk, dv
// travel around the ring with their slice and come home), and rank 0 gathers
// the slices and checks out and dk against one process running the whole
// sequence.
#include <attn/attn.hpp>
#include <attn/dist/ring.hpp>  // and ring_attention_backward

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  using attn::index_t;
  namespace dist = attn::dist;
  const index_t B = 1, N = 4096, Hq = 8, Hkv = 2, D = 64;  // 8 query heads share 2 KV heads
  // Zigzag needs N to divide by 2·ranks; otherwise split contiguously (uneven slices are fine).
  const auto layout = N % (2 * ranks) == 0 ? dist::SeqLayout::zigzag : dist::SeqLayout::contiguous;
  const index_t L = dist::shard_length(N, rank, ranks, layout);  // about N / ranks rows here

  // The whole sequence, the same on every rank (a real model would produce only its slice).
  std::vector<float> q(B * Hq * N * D), k(B * Hkv * N * D), v(k.size());
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (auto* buf : {&q, &k, &v})
    for (float& x : *buf) x = normal(gen);
  auto qf = attn::bhsd(q.data(), B, Hq, N, D);
  auto kf = attn::bhsd(k.data(), B, Hkv, N, D);
  auto vf = attn::bhsd(v.data(), B, Hkv, N, D);

  // This rank's slice of q, k, v.
  std::vector<float> ql(B * Hq * L * D), kl(B * Hkv * L * D), vl(kl.size()), ol(ql.size());
  auto qv = attn::bhsd(ql.data(), B, Hq, L, D);
  auto kv = attn::bhsd(kl.data(), B, Hkv, L, D);
  auto vv = attn::bhsd(vl.data(), B, Hkv, L, D);
  auto ov = attn::bhsd(ol.data(), B, Hq, L, D);
  dist::shard(qf, qv, rank, ranks, layout);
  dist::shard(kf, kv, rank, ranks, layout);
  dist::shard(vf, vv, rank, ranks, layout);

  dist::RingTimings timings;
  dist::DistOptions opt;
  opt.layout = layout;
  opt.timings = &timings;
  std::vector<float> lse(B * Hq * L);  // the forward's log-sum-exp, for the backward
  opt.lse = attn::TensorView<float, 3>(lse.data(), {B, Hq, L});
  MPI_Barrier(MPI_COMM_WORLD);
  dist::ring_attention(MPI_COMM_WORLD, attn::Tensor4<const float>(qv),
                       attn::Tensor4<const float>(kv), attn::Tensor4<const float>(vv), ov,
                       attn::causal(), attn::no_score_mod(), opt);
  std::printf("rank %d: %td rows, %d ring steps, compute %.1f ms, waiting %.1f ms, total %.1f ms\n",
              rank, L, timings.steps, timings.compute * 1e3, timings.exposed_comm * 1e3,
              timings.total * 1e3);

  // Backward: the loss gradient dL/dout of this rank's rows (here random) gives
  // dq, dk, dv of this rank's slices; out and lse are what the forward wrote.
  std::vector<float> dout(q.size());
  for (float& x : dout) x = normal(gen);
  std::vector<float> dol(ql.size()), dql(ql.size()), dkl(kl.size()), dvl(kl.size());
  auto dof = attn::bhsd(dout.data(), B, Hq, N, D);
  dist::shard(dof, attn::bhsd(dol.data(), B, Hq, L, D), rank, ranks, layout);
  MPI_Barrier(MPI_COMM_WORLD);
  dist::ring_attention_backward(
      MPI_COMM_WORLD, attn::Tensor4<const float>(qv), attn::Tensor4<const float>(kv),
      attn::Tensor4<const float>(vv), attn::Tensor4<const float>(ov),
      attn::TensorView<const float, 3>(lse.data(), {B, Hq, L}),
      attn::bhsd(static_cast<const float*>(dol.data()), B, Hq, L, D),
      attn::bhsd(dql.data(), B, Hq, L, D), attn::bhsd(dkl.data(), B, Hkv, L, D),
      attn::bhsd(dvl.data(), B, Hkv, L, D), attn::causal(), attn::no_score_mod(), opt);
  std::printf("rank %d: backward compute %.1f ms, waiting %.1f ms, total %.1f ms\n", rank,
              timings.compute * 1e3, timings.exposed_comm * 1e3, timings.total * 1e3);

  // Rank 0 gathers every slice of x ([B, H, L_r, D] per rank), in sequence order.
  auto gather = [&](const std::vector<float>& local, index_t H) {
    std::vector<int> counts(static_cast<std::size_t>(ranks)), displs(counts.size());
    for (int r = 0, at = 0; r < ranks; ++r) {
      counts[static_cast<std::size_t>(r)] =
          static_cast<int>(B * H * dist::shard_length(N, r, ranks, layout) * D);
      displs[static_cast<std::size_t>(r)] = at;
      at += counts[static_cast<std::size_t>(r)];
    }
    std::vector<float> gathered(rank == 0 ? B * H * N * D : 0), whole(gathered.size());
    MPI_Gatherv(local.data(), static_cast<int>(local.size()), MPI_FLOAT, gathered.data(),
                counts.data(), displs.data(), MPI_FLOAT, 0, MPI_COMM_WORLD);
    if (rank == 0)
      for (int r = 0; r < ranks; ++r)
        dist::unshard(attn::bhsd(gathered.data() + displs[static_cast<std::size_t>(r)], B, H,
                                 dist::shard_length(N, r, ranks, layout), D),
                      attn::bhsd(whole.data(), B, H, N, D), r, ranks, layout);
    return whole;
  };
  const std::vector<float> out = gather(ol, Hq), dk = gather(dkl, Hkv);
  int rc = 0;
  if (rank == 0) {
    std::vector<float> ref(q.size()), ref_lse(B * Hq * N), dq1(q.size()), dk1(k.size()),
        dv1(k.size());
    attn::AttentionOptions one;
    one.lse = attn::TensorView<float, 3>(ref_lse.data(), {B, Hq, N});
    attn::masked_attention(qf, kf, vf, attn::bhsd(ref.data(), B, Hq, N, D), attn::causal(), one);
    attn::attention_backward(qf, kf, vf, attn::bhsd(ref.data(), B, Hq, N, D),
                             attn::TensorView<const float, 3>(ref_lse.data(), {B, Hq, N}), dof,
                             attn::bhsd(dq1.data(), B, Hq, N, D),
                             attn::bhsd(dk1.data(), B, Hkv, N, D),
                             attn::bhsd(dv1.data(), B, Hkv, N, D), attn::causal());
    double err = 0, dk_err = 0, dk_max = 0;
    for (std::size_t i = 0; i < out.size(); ++i)
      err = std::max(err, static_cast<double>(std::abs(out[i] - ref[i])));
    for (std::size_t i = 0; i < dk.size(); ++i) {
      dk_err = std::max(dk_err, static_cast<double>(std::abs(dk[i] - dk1[i])));
      dk_max = std::max(dk_max, static_cast<double>(std::abs(dk1[i])));
    }
    std::printf(
        "%d ranks, N = %td, %s layout, causal, GQA %td/%td heads: "
        "max |ring - one process| = %.3g (out), %.3g (dk, of max |dk| %.3g)\n",
        ranks, N, dist::layout_name(layout), Hq, Hkv, err, dk_err, dk_max);
    rc = err < 1e-4 && dk_err < 1e-4 * std::max(dk_max, 1.0) ? 0 : 1;
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
