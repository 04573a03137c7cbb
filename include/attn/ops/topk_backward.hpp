// attn/ops/topk_backward.hpp — gradients of top-k attention through the
// selected keys: attn::topk_attention_backward.
//
// The selection has no gradient: each row's softmax runs over its selected
// keys J only, so the gradients flow into those keys alone. For row i with
// x_j = scale·q_i·k_j, s_j = score_mod(x_j) (j in J):
//
//   P_j  = exp(s_j - m) / Σ_J exp(s_j' - m)          the forward's weights     (|J|)
//   Δ_i  = rowsum(dO_i ∘ O_i)                        = Σ_J P_j dP_j
//   dP_j = dO_i · v_j
//   dS_j = P_j (dP_j - Δ_i);  dX_j = score_mod'(x_j) · dS_j   (dbias takes dS_j there)
//   dq_i = scale · Σ_J dX_j k_j,   dk_j += scale · dX_j q_i,   dv_j += P_j dO_i
//
// The selection is the forward's (TopkOptions::indices), or recomputed by the
// forward's selection pass when not given. P is recomputed from the |J|
// selected scores of the row, so no lse is needed.
//
// One task per (batch, KV head): it owns dK, dV of that head and dQ of the
// query heads of its group; its rows run in the order (head of the group,
// query row, selected key), so every sum has a fixed order and results are
// bitwise identical for any thread count (no atomics). A modifier's
// gradient output broadcast over batches or KV heads (dbias, a bias table)
// makes one task cover all of them, as in the dense backward. Work is
// O(Lq·k_best·(D + Dv)) per query head plus zeroing dK, dV (Lk·(D + Dv)),
// on B·Hkv tasks (one sequence of MQA runs on one thread). The time goes to
// the scattered rows of K, V, dK, dV; sorting the (row, key) pairs by key so
// that dK, dV are written in one ordered sweep was tried and was slower.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/engine/backward.hpp"
#include "attn/mask.hpp"
#include "attn/ops/backward.hpp"
#include "attn/ops/topk.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace attn {
namespace detail {

/// Per-worker scratch of the top-k backward.
template <class Acc>
struct TopkBackwardScratch {
  std::vector<Acc> qs, dob, dq;  // (D) scale·q row, (Dv) dO row, (D) Σ dX_j k_j
  std::vector<Acc> x, p;         // (k_best) raw scores of the selected keys; their weights
  std::vector<Acc> dk, dv;       // (Lk, D), (Lk, Dv) accumulators when dk, dv are not Acc
  AttentionStats stats;
  TopkBackwardScratch(index_t d, index_t dvd, index_t kb, index_t dk_rows, index_t dv_rows)
      : qs(static_cast<std::size_t>(d)), dob(static_cast<std::size_t>(dvd)),
        dq(static_cast<std::size_t>(d)), x(static_cast<std::size_t>(kb)),
        p(static_cast<std::size_t>(kb)), dk(static_cast<std::size_t>(dk_rows * d)),
        dv(static_cast<std::size_t>(dv_rows * dvd)) {}
};

/// Σ_c a[c]·b[c·sb] over c < n (sb = 1 when Unit), in 16 interleaved partial
/// sums added pairwise at the end: a fixed order on every thread, and one
/// vector register of sums when b is contiguous.
template <bool Unit, class Acc, class T>
Acc topk_dot(const Acc* a, const T* b, index_t n, index_t sb) {
  constexpr int kLanes = 16;
  const index_t st = Unit ? 1 : sb;
  Acc part[kLanes] = {};
  index_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[c + l] * static_cast<Acc>(b[(c + l) * st]);
  for (int l = 0; c + l < n; ++l) part[l] += a[c + l] * static_cast<Acc>(b[(c + l) * st]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

/// y[c·sy] += alpha·x[c] over c < n (sy = 1 when Unit).
template <bool Unit, class Acc, class X>
void topk_axpy(Acc* y, index_t sy, Acc alpha, const X* x, index_t sx, index_t n) {
  const index_t ty = Unit ? 1 : sy, tx = Unit ? 1 : sx;
  for (index_t c = 0; c < n; ++c) y[c * ty] += alpha * static_cast<Acc>(x[c * tx]);
}

/// Asks for the cache lines of a row of n elements (stride s) ahead of use.
template <class T>
void prefetch_row(const T* row, index_t n, index_t s) {
  constexpr index_t line = 64 / static_cast<index_t>(sizeof(T));
  for (index_t c = 0; c < n; c += line) __builtin_prefetch(row + c * s);
}

/// The selected keys of every row, -1 past the last: checked against Lk and
/// the mask before anything is written.
template <class Mask>
void check_topk_indices(const TensorView<const std::int64_t, 4>& ix, const AttentionShape& s,
                        const Mask& mask, const Positions& pos) {
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h)
      for (index_t i = 0; i < s.lq; ++i) {
        bool ended = false;
        for (index_t j = 0; j < ix.extent(3); ++j) {
          const std::int64_t key = ix(b, h, i, j);
          if (key == -1) {
            ended = true;
            continue;
          }
          if (ended)
            fail("indices(", b, ", ", h, ", ", i, ", ", j, ") is ", key,
                 ", after a -1 (a row's selected keys come first, then -1)");
          if (key < 0 || key >= s.lk)
            fail("indices(", b, ", ", h, ", ", i, ", ", j, ") is ", key, ", expected a key in [0, ",
                 s.lk, ") (Lk) or -1");
          if (!mask.keep(b, h, pos.q_offset + i, pos.k_offset + key))
            fail("indices(", b, ", ", h, ", ", i, ", ", j, ") is key ", key,
                 ", which the mask hides from query ", i,
                 " (the indices must be the forward's selection under the same mask)");
        }
      }
}

/// The backward pass. Arguments are checked, policies bound, dbias zeroed;
/// `ix` holds every row's selection ([B, Hq, Lq, k_best], -1 past the last).
template <class Acc, class Q, class K, class V, class O, class DO, class DQ, class DK, class DV,
          class Mask, class Mod>
void topk_backward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                   const TensorView<const V, 4>& v, const TensorView<const O, 4>& out,
                   const TensorView<const DO, 4>& dout, const TensorView<DQ, 4>& dq,
                   const TensorView<DK, 4>& dk, const TensorView<DV, 4>& dv,
                   const TensorView<const std::int64_t, 4>& ix, const AttentionShape& shape,
                   const Mask&, const Mod& mod, const AttentionOptions& opt) {
  // dK, dV accumulate in place when stored in the accumulation type.
  constexpr bool dk_in_place = std::is_same<DK, Acc>::value;
  constexpr bool dv_in_place = std::is_same<DV, Acc>::value;
  const Acc scale =
      static_cast<Acc>(opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(shape.d))));
  const index_t group = shape.q_heads / shape.kv_heads;
  const index_t d = shape.d, dvd = shape.dv, lk = shape.lk, kb = ix.extent(3);
  const index_t qoff = opt.positions.q_offset, koff = opt.positions.k_offset;

  // A broadcast gradient output of the modifier is summed over batches or KV heads in one task.
  const GradBroadcast bcast = grad_broadcast(mod, shape);
  const index_t nb = bcast.batch ? shape.batch : 1, nh = bcast.heads ? shape.kv_heads : 1;
  const index_t th = shape.kv_heads / nh;
  const index_t tasks = (shape.batch / nb) * th;
  const int threads = resolve_threads(opt.num_threads, tasks);

  auto make_scratch = [&] {
    return std::make_unique<TopkBackwardScratch<Acc>>(d, dvd, kb, dk_in_place ? 0 : lk,
                                                      dv_in_place ? 0 : lk);
  };

  auto run_unit = [&](TopkBackwardScratch<Acc>& sc, index_t b, index_t hk) {
    // dK, dV of (b, hk): rows of dk, dv themselves, or of the scratch accumulators.
    Acc* dk_base = nullptr;
    Acc* dv_base = nullptr;
    index_t dk_s2 = d, dk_s3 = 1, dv_s2 = dvd, dv_s3 = 1;
    if constexpr (dk_in_place) {
      dk_base = &dk(b, hk, 0, 0);
      dk_s2 = dk.stride(2);
      dk_s3 = dk.stride(3);
    } else {
      dk_base = sc.dk.data();
    }
    if constexpr (dv_in_place) {
      dv_base = &dv(b, hk, 0, 0);
      dv_s2 = dv.stride(2);
      dv_s3 = dv.stride(3);
    } else {
      dv_base = sc.dv.data();
    }
    for (index_t j = 0; j < lk; ++j) {  // dK = 0, dV = 0
      if (dk_s3 == 1)
        std::fill_n(dk_base + j * dk_s2, d, Acc(0));
      else
        for (index_t c = 0; c < d; ++c) dk_base[j * dk_s2 + c * dk_s3] = Acc(0);
      if (dv_s3 == 1)
        std::fill_n(dv_base + j * dv_s2, dvd, Acc(0));
      else
        for (index_t c = 0; c < dvd; ++c) dv_base[j * dv_s2 + c * dv_s3] = Acc(0);
    }
    const K* k_base = k.data() + b * k.stride(0) + hk * k.stride(1);
    const V* v_base = v.data() + b * v.stride(0) + hk * v.stride(1);
    const index_t k_s2 = k.stride(2), k_s3 = k.stride(3), v_s2 = v.stride(2), v_s3 = v.stride(3);
    Acc* qs = sc.qs.data();
    Acc* dob = sc.dob.data();
    Acc* gq = sc.dq.data();
    Acc* x = sc.x.data();
    Acc* p = sc.p.data();

    // The rows of the group, in order; `unit`: k, v, dk, dv rows are contiguous.
    auto rows = [&](auto unit) {
      constexpr bool U = decltype(unit)::value;
      for (index_t g = 0; g < group; ++g) {
        const index_t h = hk * group + g;
        for (index_t i = 0; i < shape.lq; ++i) {
          index_t n = 0;  // selected keys of the row: the first n entries
          while (n < kb && ix(b, h, i, n) >= 0) ++n;
          if (n == 0) {  // the row sees no key: no gradient
            for (index_t c = 0; c < d; ++c) dq(b, h, i, c) = DQ(0);
            continue;
          }
          sc.stats.scores += n;
          const index_t gi = qoff + i;  // global query position
          Acc delta = 0;                // Δ_i = rowsum(dO_i ∘ O_i)
          for (index_t c = 0; c < dvd; ++c) {
            dob[c] = static_cast<Acc>(dout(b, h, i, c));
            delta += dob[c] * static_cast<Acc>(out(b, h, i, c));
          }
          for (index_t c = 0; c < d; ++c) {
            qs[c] = static_cast<Acc>(q(b, h, i, c)) * scale;
            gq[c] = 0;
          }

          // The selected rows are scattered over K, V, dK, dV: fetch them all first.
          for (index_t j = 0; j < n; ++j) {
            const index_t key = static_cast<index_t>(ix(b, h, i, j));
            prefetch_row(k_base + key * k_s2, d, k_s3);
            prefetch_row(v_base + key * v_s2, dvd, v_s3);
            prefetch_row(dk_base + key * dk_s2, d, dk_s3);
            prefetch_row(dv_base + key * dv_s2, dvd, dv_s3);
          }
          // x_j = scale·q·k_j, s_j = score_mod(x_j) (kept in p), m = max_j s_j
          Acc m = -std::numeric_limits<Acc>::infinity();
          for (index_t j = 0; j < n; ++j) {
            const index_t key = static_cast<index_t>(ix(b, h, i, j));
            x[j] = topk_dot<U>(qs, k_base + key * k_s2, d, k_s3);
            p[j] = mod(b, h, gi, koff + key, x[j]);
            m = std::max(m, p[j]);
          }
          // P_j = exp(s_j - m) / Σ exp(s_j' - m)
          Acc l = 0;
          for (index_t j = 0; j < n; ++j) {
            p[j] = std::exp(p[j] - m);
            l += p[j];
          }
          const Acc inv = Acc(1) / l;
          for (index_t j = 0; j < n; ++j) p[j] *= inv;

          for (index_t j = 0; j < n; ++j) {
            const index_t key = static_cast<index_t>(ix(b, h, i, j));
            const K* kr = k_base + key * k_s2;
            const Acc dp = topk_dot<U>(dob, v_base + key * v_s2, dvd, v_s3);  // dO_i · v_j
            Acc dx = p[j] * (dp - delta);  // dS_j, then dX_j = score_mod'(x_j) · dS_j
            if constexpr (!Mod::is_identity) dx = mod.grad(b, h, gi, koff + key, x[j], dx);
            topk_axpy<U>(gq, 1, dx, kr, k_s3, d);                      // Σ dX_j k_j
            topk_axpy<U>(dk_base + key * dk_s2, dk_s3, dx, qs, 1, d);  // dk_j += dX_j·(scale·q_i)
            topk_axpy<U>(dv_base + key * dv_s2, dv_s3, p[j], dob, 1, dvd);  // dv_j += P_j·dO_i
          }
          for (index_t c = 0; c < d; ++c) dq(b, h, i, c) = static_cast<DQ>(scale * gq[c]);
        }
      }
    };
    if (k_s3 == 1 && v_s3 == 1 && dk_s3 == 1 && dv_s3 == 1)
      rows(std::true_type{});
    else
      rows(std::false_type{});
    if constexpr (!dk_in_place)
      for (index_t j = 0; j < lk; ++j)
        for (index_t c = 0; c < d; ++c) dk(b, hk, j, c) = static_cast<DK>(dk_base[j * d + c]);
    if constexpr (!dv_in_place)
      for (index_t j = 0; j < lk; ++j)
        for (index_t c = 0; c < dvd; ++c) dv(b, hk, j, c) = static_cast<DV>(dv_base[j * dvd + c]);
  };

  auto run_task = [&](TopkBackwardScratch<Acc>& sc, index_t t) {
    const index_t b0 = t / th * nb, hk0 = t % th * nh;
    for (index_t b = b0; b < b0 + nb; ++b)
      for (index_t hk = hk0; hk < hk0 + nh; ++hk) run_unit(sc, b, hk);
  };
  auto merge_stats = [&](const TopkBackwardScratch<Acc>& sc) {
    if (opt.stats) opt.stats->add(sc.stats);
  };
  if (opt.stats) *opt.stats = AttentionStats{};
  parallel_tasks(tasks, threads, make_scratch, run_task, merge_stats);
}

}  // namespace detail

/// Gradients of topk_attention(q, k, v, out, k_best, mask, score_mod, options)
/// for the loss gradient `dout` = dL/dout: writes dq, dk, dv (and dL/dbias
/// into a modifier's gradient output, e.g. additive_bias(bias, dbias) or a
/// bias table's with_table_grad). The selection has no gradient: each row's
/// softmax is over its selected keys only, so gradients reach those keys
/// alone (dk, dv are zero on keys no query selected).
///
/// options.indices, when given, is read as the forward's selection
/// ([B, Hq, Lq, k_best], what topk_attention wrote there) and the backward
/// costs O(Lq·k_best·(D + Dv)) per query head; when not given, the selection
/// is recomputed (one Q·Kᵀ pass, as the forward's). The mask, score modifier,
/// scale and tiles must be those of the forward; `out` is the forward's
/// output. No lse is needed (options.lse is ignored): P is recomputed from
/// each row's selected scores. Shapes: dq like q, dk like k, dv like v, dout
/// like out; with GQA, dk and dv sum over the query heads of a group. Rows
/// with nothing selected get zero gradients. Results are bitwise identical
/// for any thread count. A custom_score_mod needs its derivative. Dropout
/// and attention sinks are refused (top-k attention has neither).
template <class Q, class K, class V, class O, class DO, class DQ, class DK, class DV,
          class Mask = NoMask, class Mod = NoScoreMod, class = std::enable_if_t<is_mask_v<Mask>>>
void topk_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                             const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                             const TensorView<DO, 4>& dout, const TensorView<DQ, 4>& dq,
                             const TensorView<DK, 4>& dk, const TensorView<DV, 4>& dv,
                             index_t k_best, const Mask& mask = {}, const Mod& score_mod = {},
                             const TopkOptions& options = {}) {
  static_assert(detail::is_storage_type_v<std::remove_cv_t<Q>> &&
                    detail::is_storage_type_v<std::remove_cv_t<K>> &&
                    detail::is_storage_type_v<std::remove_cv_t<V>> &&
                    detail::is_storage_type_v<std::remove_cv_t<O>> &&
                    detail::is_storage_type_v<std::remove_cv_t<DO>> &&
                    detail::is_storage_type_v<DQ> && detail::is_storage_type_v<DK> &&
                    detail::is_storage_type_v<DV>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<DQ>::value && !std::is_const<DK>::value && !std::is_const<DV>::value,
                "attn: the gradient views dq, dk, dv must be writable");
  static_assert(is_score_mod_v<Mod>,
                "attn: the score_mod argument must be a score modifier (attn/score_mod.hpp)");
  if (k_best < 1) detail::fail("k_best is ", k_best, ", must be >= 1");
  if (options.dropout.enabled())
    detail::fail("dropout.p is ", options.dropout.p, ", but top-k attention has no dropout");
  if (!options.sinks.is_null())
    detail::fail("sinks are given, but top-k attention has no attention sinks");
  AttentionOptions opt = options;
  opt.lse = {};  // not needed: P comes from each row's selected scores
  AttentionOptions probe_opt;
  probe_opt.positions = opt.positions;
  const AttentionShape probe = detail::check_attention(q, k, v, out, probe_opt);
  const AttentionShape global = detail::global_shape(probe, opt.positions);
  const Mask bound_mask = mask.bind(global);  // policies see global positions
  const Mod bound_mod = score_mod.bind(global);
  const TensorView<const float, 3> no_lse;
  const AttentionShape shape =
      detail::check_backward(q, k, v, out, no_lse, dout, dq, dk, dv, bound_mask, bound_mod, opt);

  const TensorView<const std::int64_t, 4> given = options.indices;
  if (!given.is_null()) {
    if (given.extent(0) != shape.batch || given.extent(1) != shape.q_heads ||
        given.extent(2) != shape.lq || given.extent(3) != k_best)
      detail::fail("indices has shape ", detail::shape_str(given), ", expected [", shape.batch,
                   ", ", shape.q_heads, ", ", shape.lq, ", ", k_best,
                   "] (batch, q heads, Lq, k_best)");
    detail::check_view(given, "indices");
    auto against = [&](const auto& g, const char* gn) {
      detail::check_no_overlap(g, gn, given, "indices");
    };
    against(dq, "dq");
    against(dk, "dk");
    against(dv, "dv");
    detail::for_each_grad_view(bound_mod, against);
    detail::check_topk_indices(given, shape, bound_mask, opt.positions);
  }

  // Checks passed: from here on outputs are written.
  detail::for_each_grad_view(bound_mod, [](const auto& g, const char*) {
    for (index_t a = 0; a < g.extent(0); ++a)
      for (index_t b = 0; b < g.extent(1); ++b)
        for (index_t i = 0; i < g.extent(2); ++i)
          for (index_t j = 0; j < g.extent(3); ++j) g(a, b, i, j) = 0;
  });
  std::vector<std::int64_t> recomputed;
  TensorView<const std::int64_t, 4> ix = given;
  if (given.is_null()) {  // the forward's selection pass, with the forward's accumulation type
    recomputed.resize(static_cast<std::size_t>(shape.batch * shape.q_heads * shape.lq * k_best));
    TopkOptions sel = options;
    sel.lse = {};
    sel.stats = nullptr;
    sel.indices = TensorView<std::int64_t, 4>(recomputed.data(),
                                              {shape.batch, shape.q_heads, shape.lq, k_best});
    using FwdAcc = detail::accum_t<Q, K, V, O>;
    detail::topk_forward<FwdAcc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>,
                         std::remove_cv_t<O>>(q, k, v, TensorView<std::remove_cv_t<O>, 4>(), shape,
                                              k_best, bound_mask, bound_mod, sel);
    ix = sel.indices;
  }
  using Acc = detail::accum_t<Q, K, V, O, DO, DQ, DK, DV>;
  detail::topk_backward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>,
                        std::remove_cv_t<O>, std::remove_cv_t<DO>>(
      q, k, v, out, dout, dq, dk, dv, ix, shape, bound_mask, bound_mod, opt);
}

/// Same, with options and no mask or score modifier.
template <class Q, class K, class V, class O, class DO, class DQ, class DK, class DV>
void topk_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                             const TensorView<V, 4>& v, const TensorView<O, 4>& out,
                             const TensorView<DO, 4>& dout, const TensorView<DQ, 4>& dq,
                             const TensorView<DK, 4>& dk, const TensorView<DV, 4>& dv,
                             index_t k_best, const TopkOptions& options) {
  topk_attention_backward(q, k, v, out, dout, dq, dk, dv, k_best, no_mask(), no_score_mod(),
                          options);
}

}  // namespace attn
