// ring_attention — causal attention over a sequence split across MPI ranks.
//
//   mpirun -np 4 build/main/examples/ring_attention
//
// Each rank holds 1/p of a 4096-token sequence in the zigzag layout (chunks r
// and 2p−1−r of 2p, so every rank does the same causal work; contiguous
// slices when 2p does not divide 4096), runs
// ring_attention with grouped-query heads, and rank 0 gathers the slices and
// checks them against one process running the whole sequence.
#include <attn/attn.hpp>
#include <attn/dist/ring.hpp>

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
  MPI_Barrier(MPI_COMM_WORLD);
  dist::ring_attention(MPI_COMM_WORLD, attn::Tensor4<const float>(qv),
                       attn::Tensor4<const float>(kv), attn::Tensor4<const float>(vv), ov,
                       attn::causal(), attn::no_score_mod(), opt);
  std::printf("rank %d: %td rows, %d ring steps, compute %.1f ms, waiting %.1f ms, total %.1f ms\n",
              rank, L, timings.steps, timings.compute * 1e3, timings.exposed_comm * 1e3,
              timings.total * 1e3);

  // Rank 0 gathers every slice, puts it back in sequence order and checks it.
  std::vector<int> counts(static_cast<std::size_t>(ranks)), displs(counts.size());
  for (int r = 0, at = 0; r < ranks; ++r) {
    counts[static_cast<std::size_t>(r)] =
        static_cast<int>(B * Hq * dist::shard_length(N, r, ranks, layout) * D);
    displs[static_cast<std::size_t>(r)] = at;
    at += counts[static_cast<std::size_t>(r)];
  }
  std::vector<float> gathered(rank == 0 ? q.size() : 0);
  MPI_Gatherv(ol.data(), static_cast<int>(ol.size()), MPI_FLOAT, gathered.data(), counts.data(),
              displs.data(), MPI_FLOAT, 0, MPI_COMM_WORLD);
  int rc = 0;
  if (rank == 0) {
    std::vector<float> out(q.size()), ref(q.size());
    auto of = attn::bhsd(out.data(), B, Hq, N, D);
    for (int r = 0; r < ranks; ++r)
      dist::unshard(attn::bhsd(gathered.data() + displs[static_cast<std::size_t>(r)], B, Hq,
                               dist::shard_length(N, r, ranks, layout), D),
                    of, r, ranks, layout);
    attn::masked_attention(qf, kf, vf, attn::bhsd(ref.data(), B, Hq, N, D), attn::causal());
    double err = 0;
    for (std::size_t i = 0; i < out.size(); ++i)
      err = std::max(err, static_cast<double>(std::abs(out[i] - ref[i])));
    std::printf(
        "%d ranks, N = %td, %s layout, causal, GQA %td/%td heads: "
        "max |ring - one process| = %.3g\n",
        ranks, N, dist::layout_name(layout), Hq, Hkv, err);
    rc = err < 1e-4 ? 0 : 1;
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
