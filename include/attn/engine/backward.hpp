// attn/engine/backward.hpp — the backward pass of the flash engine
// (FlashAttention 2), for every mask policy and score modifier.
//
// One task per (batch b, KV head hk): it owns dK, dV of that head and dQ of
// the query heads of its group, so nothing is shared between tasks, no
// atomics are needed, and every sum runs in a fixed order (bitwise identical
// for any thread count). Within a task:
//
//   Δ_i = rowsum(dO_i ∘ O_i)                       once per query row of the group
//   for each key tile [k0, k0+Bc):                 (keys outer: dK, dV stay in registers/L1)
//     dK_t = 0, dV_t = 0                                         (Bc, D), (Bc, Dv)
//     for each query head h of the group, each query tile the mask lets see the tile:
//       X  = scale·Q · Kᵀ                                        (Br, Bc) raw scores
//       S  = mask(score_mod(X));  P = exp(S - lse)               (lse from the forward)
//       Pd = P ∘ M / (1 - p)                                     (dropout decisions M)
//       dV_t += Pdᵀ · dO                                         (Bc, Dv)
//       dP = (dO · Vᵀ) ∘ M / (1 - p)                             (Br, Bc)
//       dS = P ∘ (dP - Δ);  dX = score_mod'(X) ∘ dS              (dbias takes dS there)
//       dK_t += dXᵀ · (scale·Q)                                  (Bc, D)
//       dQ   += scale · dX · K                                   (Br, D), over key tiles in order
//     dK[k0:] = dK_t, dV[k0:] = dV_t
//
// Masks, modifiers and dropout see global positions (AttentionOptions::positions):
// local query row i is q_offset + i, local key j is k_offset + j.
//
// Five tile products per visited tile (the forward has two). Scratch per
// worker is O(Br·Bc + (Br + Bc)·(D + Dv)) plus, when dq is not stored in the
// accumulation type with unit column stride, a (group·Lq, D) accumulator for
// dQ. Nothing grows with Lq·Lk.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/softmax.hpp"
#include "attn/engine/walk.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/kernels/pack.hpp"
#include "attn/kv/strided.hpp"
#include "attn/mask.hpp"
#include "attn/options.hpp"
#include "attn/policy/dropout.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

namespace attn {
namespace detail {

/// Tile constants of the backward: five products per tile and three
/// (Br, Bc) buffers want a smaller tile than the forward's.
struct BackwardTileTraits {
  static constexpr index_t block_q = 64;
  static constexpr index_t block_k = 128;
  /// Fewer (batch, KV head) units than this split their queries (flash_backward).
  static constexpr index_t min_tasks = 8;
  /// Most bytes of dK, dV split buffers a call allocates.
  static constexpr double split_buffer_bytes = 64.0 * 1024 * 1024;
  static_assert(block_q > 0 && block_k > 0, "tiles must be non-empty");
};

/// Per-worker scratch of the backward. The products run on the forward's
/// micro-kernels (kernels/): S = A·Bᵀ products on K panels (score), C += A·B
/// on rows padded to a multiple of 16 columns (pv); the two Aᵀ·B products
/// read their (Br, Bc) operand transposed in place (pv_t).
template <class Acc>
struct BackwardScratch {
  using Mat = RowMatrix<Acc>;
  using Vec = Eigen::Array<Acc, Eigen::Dynamic, 1>;
  Mat qs;      // (Br, Dp)  scale · Q tile, zero past D
  Mat dob;     // (Br, Dvp) dO tile, zero past Dv
  Mat p;       // (Br, lds) P
  Mat x;       // (Br, lds) raw scores, for modifiers whose derivative needs them
  Mat dp;      // (Br, lds) Pd, then dP, then dS and dX
  Mat kpad;    // (Bc, Dp)  K tile rows, zero past D (dQ += dX·K)
  Mat dk, dv;  // (Bc, Dp), (Bc, Dvp) accumulators of one key tile
  Mat dq;      // (group·Lq, Dp) dQ accumulator, when dq cannot accumulate in place
  std::vector<Acc> kpan, vpan, row;  // K and V tiles as score panels; one converted row
  Vec delta;                         // (group·Lq) rowsum(dO ∘ O)
  Vec lse;                           // (group·Lq)
  AttentionStats stats;

  BackwardScratch(const kernels::KernelSet<Acc>& ks, index_t br, index_t bc, index_t lds, index_t d,
                  index_t dv_, index_t group_rows, bool keep_x, bool dq_buffer)
      : qs(Mat::Zero(br, kernels::padded_dv(d))), dob(Mat::Zero(br, kernels::padded_dv(dv_))),
        p(br, lds), x(keep_x ? br : 0, keep_x ? lds : 0), dp(br, lds),
        kpad(Mat::Zero(bc, kernels::padded_dv(d))), dk(bc, kernels::padded_dv(d)),
        dv(bc, kernels::padded_dv(dv_)), dq(dq_buffer ? group_rows : 0, kernels::padded_dv(d)),
        kpan(static_cast<std::size_t>(kernels::packed_k_size(bc, d, ks.k_panel))),
        vpan(static_cast<std::size_t>(kernels::packed_k_size(bc, dv_, ks.k_panel))),
        row(static_cast<std::size_t>(std::max(d, dv_))), delta(group_rows), lse(group_rows) {}
};

/// Which dimensions of the gradient views of a modifier (dbias) are
/// broadcast over more than one (batch, KV head) task.
struct GradBroadcast {
  bool batch = false, heads = false;
};
template <class Mod>
GradBroadcast grad_broadcast(const Mod& mod, const AttentionShape& s) {
  GradBroadcast r;
  for_each_grad_view(mod, [&](const auto& g, const char*) {
    r.batch = r.batch || (g.extent(0) == 1 && s.batch > 1);
    r.heads = r.heads || (g.extent(1) == 1 && s.kv_heads > 1);
  });
  return r;
}

/// The backward engine. Arguments are checked, policies bound, dbias zeroed.
template <class Acc, class Q, class K, class V, class O, class L, class DO, class DQ, class DK,
          class DV, class Mask, class Mod>
void flash_backward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                    const TensorView<const V, 4>& v, const TensorView<const O, 4>& out,
                    const TensorView<const L, 3>& lse, const TensorView<const DO, 4>& dout,
                    const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                    const TensorView<DV, 4>& dv, const AttentionShape& shape, const Mask& mask,
                    const Mod& mod, const AttentionOptions& opt) {
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  constexpr bool keep_x = !Mod::unit_grad;

  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t br =
      std::min(opt.block_q > 0 ? opt.block_q : BackwardTileTraits::block_q, shape.lq);
  const index_t bc =
      std::min(opt.block_k > 0 ? opt.block_k : BackwardTileTraits::block_k, shape.lk);
  const index_t group = shape.q_heads / shape.kv_heads;
  const index_t group_rows = group * shape.lq;
  const index_t d = shape.d, dvd = shape.dv;
  const kernels::KernelSet<Acc>& ks = kernels::kernel_set<Acc>(active_isa());
  const index_t nr = ks.k_panel;
  const index_t dpad = kernels::padded_dv(d), dvp = kernels::padded_dv(dvd);
  const index_t lds = (bc + nr - 1) / nr * nr;  // score rows hold whole panels
  // dQ accumulates in place when the kernel's padded rows are dq's own rows.
  const bool dq_in_place = std::is_same<DQ, Acc>::value && dq.stride(3) == 1 && dpad == d;
  const AttentionShape global = global_shape(shape, opt.positions);
  const index_t qoff = opt.positions.q_offset, koff = opt.positions.k_offset;
  const DropoutGen drop =
      DropoutGen::bind(opt.dropout, shape.batch, shape.q_heads, global.lq, global.lk);

  // A broadcast dbias is summed over batches or KV heads inside one task, in order.
  const GradBroadcast bcast = grad_broadcast(mod, shape);
  const index_t nb = bcast.batch ? shape.batch : 1, nh = bcast.heads ? shape.kv_heads : 1;
  const index_t units = (shape.batch / nb) * (shape.kv_heads / nh);
  // Few (batch, KV head) units (one sequence of MQA): each unit's queries are
  // split into `splits` ranges of whole tiles, one task each. A task owns its
  // rows of dQ and sums dK, dV into its own buffer; the buffers are added in
  // split order afterwards. The count follows from the shape (at least 8
  // tasks, at most 64 MiB of buffers), never from the thread count, so results
  // stay bitwise the same for any count. Gradient outputs of a modifier (dbias,
  // a bias table) keep one task per unit.
  bool has_grad_view = false;
  for_each_grad_view(mod, [&](const auto&, const char*) { has_grad_view = true; });
  const index_t q_tiles = (shape.lq + br - 1) / br;
  const double split_bytes = static_cast<double>(units) * static_cast<double>(shape.lk) *
                             static_cast<double>(dpad + dvp) * sizeof(Acc);
  const index_t splits =
      has_grad_view || units >= BackwardTileTraits::min_tasks
          ? 1
          : std::max<index_t>(
                1, std::min({q_tiles, (BackwardTileTraits::min_tasks + units - 1) / units,
                             static_cast<index_t>(BackwardTileTraits::split_buffer_bytes /
                                                  std::max(split_bytes, 1.0))}));
  const index_t tiles_per_split = (q_tiles + splits - 1) / splits;
  const index_t tasks = units * splits;
  const int threads = resolve_threads(opt.num_threads, tasks);
  // Per (unit, split): dK (Lk, Dp) and dV (Lk, Dvp) sums, when splits > 1.
  std::vector<Acc> split_dk(splits > 1 ? static_cast<std::size_t>(tasks * shape.lk * dpad) : 0),
      split_dv(splits > 1 ? static_cast<std::size_t>(tasks * shape.lk * dvp) : 0);

  auto make_scratch = [&] {
    return std::make_unique<BackwardScratch<Acc>>(ks, br, bc, lds, d, dvd, group_rows, keep_x,
                                                  !dq_in_place);
  };

  // One (batch, KV head), query rows [qa, qb): dK, dV of hk (into dk, dv, or
  // when `sdk` is given into the split's buffers sdk, sdv) and those rows of
  // the group's dQ.
  auto run_unit = [&](BackwardScratch<Acc>& sc, index_t b, index_t hk, index_t qa, index_t qb,
                      Acc* sdk, Acc* sdv) {
    const index_t h0 = hk * group;
    // Δ_i = rowsum(dO_i ∘ O_i) and lse_i of every row of the group; dQ = 0.
    for (index_t g = 0; g < group; ++g) {
      const index_t h = h0 + g;
      for (index_t i = qa; i < qb; ++i) {
        Acc acc = 0;
        for (index_t c = 0; c < dvd; ++c)
          acc += static_cast<Acc>(dout(b, h, i, c)) * static_cast<Acc>(out(b, h, i, c));
        sc.delta(g * shape.lq + i) = acc;
        const double l = static_cast<double>(lse(b, h, i));
        sc.lse(g * shape.lq + i) = static_cast<Acc>(l);
      }
      if (dq_in_place)
        for (index_t i = qa; i < qb; ++i) std::fill_n(&dq(b, h, i, 0), d, DQ(0));
    }
    if (!dq_in_place) sc.dq.setZero();

    for (index_t k0 = 0; k0 < shape.lk; k0 += bc) {
      const index_t cols = std::min(bc, shape.lk - k0);
      // K and V as score panels (S = Qs·Kᵀ, dP = dO·Vᵀ), K as padded rows (dQ += dX·K).
      const K* kt = k.data() + b * k.stride(0) + hk * k.stride(1) + k0 * k.stride(2);
      const V* vt = v.data() + b * v.stride(0) + hk * v.stride(1) + k0 * v.stride(2);
      kernels::pack_k(ks, kt, k.stride(2), k.stride(3), cols, d, sc.row.data(), sc.kpan.data());
      kernels::pack_k(ks, vt, v.stride(2), v.stride(3), cols, dvd, sc.row.data(), sc.vpan.data());
      kernels::pack_v(ks, kt, k.stride(2), k.stride(3), cols, d, dpad, sc.kpad.data());
      auto dkt = sc.dk.topRows(cols);
      auto dvt = sc.dv.topRows(cols);
      dkt.setZero();
      dvt.setZero();

      for (index_t g = 0; g < group; ++g) {
        const index_t h = h0 + g;
        const KeyRange gq = query_range(mask, b, h, koff + k0, koff + k0 + cols, global.lq);
        const KeyRange qr{std::clamp<index_t>(gq.begin - qoff, qa, qb),
                          std::clamp<index_t>(gq.end - qoff, qa, qb)};
        if (qr.empty()) continue;
        // dQ of head h: dq itself when written in place (the accumulator is then
        // empty, and an offset on its null data is undefined), else its rows of sc.dq.
        Acc* dq_base = nullptr;
        if constexpr (std::is_same<DQ, Acc>::value)
          if (dq_in_place) dq_base = &dq(b, h, 0, 0);
        if (!dq_in_place) dq_base = sc.dq.data() + g * shape.lq * dpad;
        const index_t lddq = dq_in_place ? dq.stride(2) : dpad;
        for (index_t q0 = qr.begin / br * br; q0 < qr.end; q0 += br) {
          const index_t rows = std::min(br, shape.lq - q0);
          const index_t gq0 = qoff + q0, gk0 = koff + k0;  // global positions of the tile
          const TileKind kind = Mask::always_full
                                    ? TileKind::full
                                    : mask.classify(b, h, gq0, gq0 + rows, gk0, gk0 + cols);
          if (kind == TileKind::empty) {
            ++sc.stats.skipped_tiles;
            continue;
          }
          ++(kind == TileKind::full ? sc.stats.full_tiles : sc.stats.partial_tiles);
          sc.stats.scores += rows * cols;

          // Qs = scale · Q, dO                          (rows, D), (rows, Dv), zero-padded
          sc.qs.topLeftCorner(rows, d) =
              matrix(q, b, h).middleRows(q0, rows).template cast<Acc>() * scale;
          sc.dob.topLeftCorner(rows, dvd) =
              matrix(dout, b, h).middleRows(q0, rows).template cast<Acc>();
          const Acc* qs = sc.qs.data();
          const Acc* dot = sc.dob.data();

          // X = Qs · Kᵀ; S = mask(score_mod(X)); P = exp(S - lse)         (rows, cols)
          Acc* p = sc.p.data();
          ks.score(rows, cols, d, qs, dpad, sc.kpan.data(), p, lds);
          if constexpr (keep_x)
            for (index_t r = 0; r < rows; ++r) std::copy_n(p + r * lds, cols, &sc.x(r, 0));
          mod.apply_tile(b, h, gq0, gk0, p, lds, rows, cols);
          if (kind == TileKind::partial)
            mask_partial_tile(mask, b, h, gq0, gk0, p, lds, rows, cols);
          for (index_t r = 0; r < rows; ++r) {
            const Acc l = sc.lse(g * shape.lq + q0 + r);
            Acc* row = p + r * lds;
            if (l == neg_inf)  // the row sees no key: no gradient
              std::fill_n(row, cols, Acc(0));
            else
              exp_shift_sum(row, cols, l);
          }

          // dV += Pdᵀ · dO                                                   (cols, Dv)
          Acc* dp = sc.dp.data();
          const Acc* pd = p;
          if (drop.enabled) {
            for (index_t r = 0; r < rows; ++r) {
              std::copy_n(p + r * lds, cols, dp + r * lds);
              drop.apply_row(b, h, gq0 + r, gk0, dp + r * lds, cols);
            }
            pd = dp;
          }
          ks.pv_t(cols, dvp, rows, pd, lds, dot, dvp, dvt.data(), dvp);

          // dP = (dO · Vᵀ) ∘ M / (1 - p)                                     (rows, cols)
          ks.score(rows, cols, dvd, dot, dvp, sc.vpan.data(), dp, lds);
          if (drop.enabled)
            for (index_t r = 0; r < rows; ++r)
              drop.apply_row(b, h, gq0 + r, gk0, dp + r * lds, cols);

          // dS = P ∘ (dP - Δ); dX = score_mod'(X) ∘ dS
          for (index_t r = 0; r < rows; ++r) {
            const Acc delta = sc.delta(g * shape.lq + q0 + r);
            const Acc* pr = p + r * lds;
            Acc* dr = dp + r * lds;
            for (index_t c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - delta);
          }
          if constexpr (!Mod::is_identity)
            mod.grad_tile(b, h, gq0, gk0, keep_x ? sc.x.data() : static_cast<const Acc*>(nullptr),
                          dp, lds, rows, cols);

          // dK += dXᵀ · Qs                                                   (cols, D)
          ks.pv_t(cols, dpad, rows, dp, lds, qs, dpad, dkt.data(), dpad);
          // dQ += dX · K (scaled once at the end)                            (rows, D)
          ks.pv(rows, dpad, cols, dp, lds, sc.kpad.data(), dpad, dq_base + q0 * lddq, lddq, {});
        }
      }
      if (sdk) {
        std::copy_n(dkt.data(), cols * dpad, sdk + k0 * dpad);
        std::copy_n(dvt.data(), cols * dvp, sdv + k0 * dvp);
      } else {
        for (index_t r = 0; r < cols; ++r) {
          for (index_t c = 0; c < d; ++c) dk(b, hk, k0 + r, c) = static_cast<DK>(dkt(r, c));
          for (index_t c = 0; c < dvd; ++c) dv(b, hk, k0 + r, c) = static_cast<DV>(dvt(r, c));
        }
      }
    }
    // dQ = scale · Σ dX·K
    for (index_t g = 0; g < group; ++g)
      for (index_t i = qa; i < qb; ++i)
        for (index_t c = 0; c < d; ++c) {
          if (dq_in_place)
            dq(b, h0 + g, i, c) *= static_cast<DQ>(scale);
          else
            dq(b, h0 + g, i, c) = static_cast<DQ>(scale * sc.dq(g * shape.lq + i, c));
        }
  };

  const index_t th = shape.kv_heads / nh;
  auto run_task = [&](BackwardScratch<Acc>& sc, index_t t) {
    // The last query ranges first: under a causal mask they see the most keys.
    const index_t u = t / splits, sp = splits - 1 - t % splits;
    const index_t b0 = u / th * nb, hk0 = u % th * nh;
    if (splits == 1) {
      for (index_t b = b0; b < b0 + nb; ++b)
        for (index_t hk = hk0; hk < hk0 + nh; ++hk)
          run_unit(sc, b, hk, 0, shape.lq, nullptr, nullptr);
      return;
    }
    const index_t qa = std::min(shape.lq, sp * tiles_per_split * br),
                  qb = std::min(shape.lq, (sp + 1) * tiles_per_split * br);
    run_unit(sc, b0, hk0, qa, qb, split_dk.data() + (u * splits + sp) * shape.lk * dpad,
             split_dv.data() + (u * splits + sp) * shape.lk * dvp);
  };
  auto merge_stats = [&](const BackwardScratch<Acc>& sc) {
    if (!opt.stats) return;
    opt.stats->add(sc.stats);
  };
  if (opt.stats) *opt.stats = AttentionStats{};
  parallel_tasks(tasks, threads, make_scratch, run_task, merge_stats);
  if (splits == 1) return;

  // dK, dV = the splits' sums, added in split order; one task per (unit, key tile).
  const index_t k_tiles = (shape.lk + bc - 1) / bc;
  parallel_tasks(
      units * k_tiles, resolve_threads(opt.num_threads, units * k_tiles),
      [] { return std::make_unique<int>(0); },
      [&](int&, index_t t) {
        const index_t u = t / k_tiles, k0 = t % k_tiles * bc, cols = std::min(bc, shape.lk - k0);
        const index_t b = u / th, hk = u % th;
        for (index_t r = k0; r < k0 + cols; ++r) {
          for (index_t c = 0; c < d; ++c) {
            Acc sum = 0;
            for (index_t sp = 0; sp < splits; ++sp)
              sum +=
                  split_dk[static_cast<std::size_t>(((u * splits + sp) * shape.lk + r) * dpad + c)];
            dk(b, hk, r, c) = static_cast<DK>(sum);
          }
          for (index_t c = 0; c < dvd; ++c) {
            Acc sum = 0;
            for (index_t sp = 0; sp < splits; ++sp)
              sum +=
                  split_dv[static_cast<std::size_t>(((u * splits + sp) * shape.lk + r) * dvp + c)];
            dv(b, hk, r, c) = static_cast<DV>(sum);
          }
        }
      },
      [](const int&) {});
}

}  // namespace detail
}  // namespace attn
