// attn/linear/backward.hpp — gradients of linear attention (elu+1, ReLU and
// any feature map that gives its derivative), non-causal and causal, with
// the gradient of the recurrent state.
//
// With φq_i, φk_j the features, S_i = S0 + Σ_{j visible to i} φk_j v_jᵀ,
// z_i = z0 + Σ φk_j, num_i = φq_iᵀ S_i, den_i = φq_iᵀ z_i + eps,
// out_i = num_i / den_i:
//
//   gn_i = dout_i / den_i,   gd_i = -(dout_i · num_i) / den_i²
//   dφq_i = S_i gn_i + z_i gd_i                          forward sweep over queries
//   G_j = dS_out + Σ_{i sees j} φq_i gn_iᵀ,  H_j = dz_out + Σ_{i sees j} φq_i gd_i
//   dφk_j = G_j v_j + H_j,   dv_j = G_jᵀ φk_j            backward sweep over keys
//   dS0 = dS_out + Σ_i φq_i gn_iᵀ,   dz0 = dz_out + Σ_i φq_i gd_i
//   dq = dφq ∘ φ'(q),   dk = dφk ∘ φ'(k)
//
// (i sees j: always when non-causal, j <= i + Lk - Lq when causal.) One task
// per (batch, KV head) owns dk, dv, the state gradient and its group's dq:
// bitwise identical for any thread count. Time O((Lq·g + Lk)·F·Dv) with g
// query heads per KV head; scratch O((g·Lq + Lk)·(F + Dv)) per worker.
#pragma once

#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/linear.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <memory>
#include <type_traits>

namespace attn {
namespace detail {

/// True when feature map M gives derivative(x) = dφ/dx elementwise.
template <class M, class = void>
struct has_feature_derivative : std::false_type {};
template <class M>
struct has_feature_derivative<M, std::void_t<decltype(std::declval<const M&>().derivative(0.0))>>
    : std::true_type {};

template <class Acc>
struct LinearBackwardScratch {
  using Mat = RowMatrix<Acc>;
  using Vec = Eigen::Matrix<Acc, 1, Eigen::Dynamic>;  // row vectors
  Mat x;                                              // (max(Lq, Lk), D) raw q or k rows in Acc
  Mat phik;                                           // (Lk, F)
  Mat vals;                                           // (Lk, Dv)
  Mat phiq;                                           // (g·Lq, F)
  Mat gn;                                             // (g·Lq, Dv)
  Vec gd;                                             // (g·Lq)
  Mat s, gs;                                          // (F, Dv) S, then G
  Vec z, gz;                                          // (F) z, then H
  Vec drow;                                           // (max(F, Dv)) one gradient row
  LinearBackwardScratch(index_t g, index_t lq, index_t lk, index_t d, index_t f, index_t dv)
      : x(std::max(lq, lk), d), phik(lk, f), vals(lk, dv), phiq(g * lq, f), gn(g * lq, dv),
        gd(g * lq), s(f, dv), gs(f, dv), z(f), gz(f), drow(std::max(f, dv)) {}
};

template <class Acc, class Q, class K, class V, class DO, class DQ, class DK, class DV, class Map>
void linear_backward(const TensorView<const Q, 4>& q, const TensorView<const K, 4>& k,
                     const TensorView<const V, 4>& v, const TensorView<const DO, 4>& dout,
                     const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                     const TensorView<DV, 4>& dv, const AttentionShape& shape, index_t f,
                     const Map& map, const LinearState<Acc>* state_in,
                     const LinearState<Acc>* dstate, const LinearAttentionOptions& opt) {
  const index_t g = shape.q_heads / shape.kv_heads, lq = shape.lq, lk = shape.lk;
  const index_t d = shape.d, dvd = shape.dv;
  const index_t tasks = shape.batch * shape.kv_heads;
  const int threads = resolve_threads(opt.num_threads, tasks);
  const Acc eps = static_cast<Acc>(opt.eps);
  // Keys [0, key_end(i)) are visible to query i.
  auto key_end = [&](index_t i) {
    return opt.causal ? std::clamp<index_t>(i + shape.diagonal_offset() + 1, 0, lk) : lk;
  };

  auto make_scratch = [&] {
    return std::make_unique<LinearBackwardScratch<Acc>>(g, lq, lk, d, f, dvd);
  };
  auto run_task = [&](LinearBackwardScratch<Acc>& sc, index_t t) {
    const index_t b = t / shape.kv_heads, hk = t % shape.kv_heads;
    auto features = [&](const auto& view, index_t h, index_t rows, auto dst) {
      sc.x.topRows(rows) = matrix(view, b, h).template cast<Acc>();
      map.template keys<Acc>(
          FeatureInput<Acc>(sc.x.data(), rows, d, Eigen::OuterStride<>(d)),
          FeatureOutput<Acc>(dst.data(), rows, f, Eigen::OuterStride<>(dst.outerStride())));
    };
    features(k, hk, lk, sc.phik.topRows(lk));
    sc.vals = matrix(v, b, hk).template cast<Acc>();

    // Forward sweep per query head: S_i, z_i, gn, gd and dq.
    for (index_t hg = 0; hg < g; ++hg) {
      const index_t h = hk * g + hg;
      auto phiq = sc.phiq.middleRows(hg * lq, lq);
      features(q, h, lq, phiq);  // sc.x now holds q of head h
      if (state_in) {
        for (index_t r = 0; r < f; ++r) {
          for (index_t c = 0; c < dvd; ++c) sc.s(r, c) = state_in->s(b, hk, r, c);
          sc.z(r) = state_in->z(b, hk, r);
        }
      } else {
        sc.s.setZero();
        sc.z.setZero();
      }
      index_t j = 0;
      for (index_t i = 0; i < lq; ++i) {
        for (const index_t end = key_end(i); j < end; ++j) {  // S += φk_j v_jᵀ, z += φk_j
          sc.s.noalias() += sc.phik.row(j).transpose() * sc.vals.row(j);
          sc.z += sc.phik.row(j);
        }
        const Acc den = phiq.row(i).dot(sc.z) + eps;
        auto num = sc.drow.head(dvd);
        num.noalias() = phiq.row(i) * sc.s;  // (1, Dv)
        Acc dot = 0;
        for (index_t c = 0; c < dvd; ++c) dot += static_cast<Acc>(dout(b, h, i, c)) * num(c);
        const Acc gd = -dot / (den * den);
        auto gn = sc.gn.row(hg * lq + i);
        for (index_t c = 0; c < dvd; ++c) gn(c) = static_cast<Acc>(dout(b, h, i, c)) / den;
        sc.gd(hg * lq + i) = gd;
        // dφq_i = S gn + z gd;  dq = dφq ∘ φ'(q)
        for (index_t r = 0; r < f; ++r) {
          const Acc dphi = sc.s.row(r).dot(gn) + sc.z(r) * gd;
          dq(b, h, i, r) = static_cast<DQ>(dphi * map.derivative(sc.x(i, r)));
        }
      }
    }

    // Backward sweep over keys: G, H collect the queries that see key j.
    if (dstate) {
      for (index_t r = 0; r < f; ++r) {
        for (index_t c = 0; c < dvd; ++c) sc.gs(r, c) = dstate->s(b, hk, r, c);
        sc.gz(r) = dstate->z(b, hk, r);
      }
    } else {
      sc.gs.setZero();
      sc.gz.setZero();
    }
    sc.x.topRows(lk) = matrix(k, b, hk).template cast<Acc>();
    auto add_query = [&](index_t i) {
      for (index_t hg = 0; hg < g; ++hg) {
        sc.gs.noalias() += sc.phiq.row(hg * lq + i).transpose() * sc.gn.row(hg * lq + i);
        sc.gz += sc.phiq.row(hg * lq + i) * sc.gd(hg * lq + i);
      }
    };
    index_t i = lq - 1;
    for (index_t j = lk - 1; j >= 0; --j) {
      for (; i >= 0 && key_end(i) > j; --i) add_query(i);
      // dφk_j = G v_j + H;  dk = dφk ∘ φ'(k);  dv_j = Gᵀ φk_j
      for (index_t r = 0; r < f; ++r) {
        const Acc dphi = sc.gs.row(r).dot(sc.vals.row(j)) + sc.gz(r);
        dk(b, hk, j, r) = static_cast<DK>(dphi * map.derivative(sc.x(j, r)));
      }
      auto dvr = sc.drow.head(dvd);
      dvr.noalias() = sc.phik.row(j) * sc.gs;
      for (index_t c = 0; c < dvd; ++c) dv(b, hk, j, c) = static_cast<DV>(dvr(c));
    }
    for (; i >= 0; --i) add_query(i);  // queries that see no key still read S0, z0
    if (dstate)
      for (index_t r = 0; r < f; ++r) {
        for (index_t c = 0; c < dvd; ++c) dstate->s(b, hk, r, c) = sc.gs(r, c);
        dstate->z(b, hk, r) = sc.gz(r);
      }
  };
  parallel_tasks(tasks, threads, make_scratch, run_task, [](const LinearBackwardScratch<Acc>&) {});
}

/// Checks and dispatch of linear_attention_backward.
template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Map, class Acc>
void linear_backward_entry(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                           const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                           const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                           const TensorView<DV, 4>& dv, const Map& map,
                           const LinearState<Acc>* state_in, const LinearState<Acc>* dstate,
                           const LinearAttentionOptions& opt) {
  static_assert(is_storage_type_v<std::remove_cv_t<Q>> && is_storage_type_v<std::remove_cv_t<K>> &&
                    is_storage_type_v<std::remove_cv_t<V>> &&
                    is_storage_type_v<std::remove_cv_t<DO>> && is_storage_type_v<DQ> &&
                    is_storage_type_v<DK> && is_storage_type_v<DV>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(is_feature_map_v<Map>, "attn: the feature_map argument must be a feature map");
  static_assert(has_feature_derivative<Map>::value,
                "attn: linear_attention_backward needs a feature map with derivative(x) "
                "(elu_plus_one(), relu(), or your own); FAVOR+ has none yet");
  static_assert(std::is_same<Acc, accum_t<Q, K, V, DO>>::value,
                "attn: the state must be in the accumulation type: double if any of q, k, v, "
                "dout is double, float otherwise");
  index_t f = 0;
  const AttentionShape s = check_linear(q, k, v, dout, map, state_in, opt, f);
  if (f != s.d)
    fail("linear_attention_backward needs F = D (elementwise feature maps); F is ", f, ", D is ",
         s.d);
  auto same = [](const auto& a, const char* an, const auto& b, const char* bn) {
    check_view(a, an);
    for (int i = 0; i < b.rank; ++i)
      if (a.extent(i) != b.extent(i))
        fail(an, " has shape ", shape_str(a), ", expected ", shape_str(b), " (the shape of ", bn,
             ")");
  };
  same(dq, "dq", q, "q");
  same(dk, "dk", k, "k");
  same(dv, "dv", v, "v");
  check_not_self_overlapping(dq, "dq");
  check_not_self_overlapping(dk, "dk");
  check_not_self_overlapping(dv, "dv");
  if (dstate) {
    if (!state_in) fail("dstate given without the state the forward started from");
    same(dstate->s, "dstate s", state_in->s, "state s");
    same(dstate->z, "dstate z", state_in->z, "state z");
    check_not_self_overlapping(dstate->s, "dstate s");
    check_not_self_overlapping(dstate->z, "dstate z");
  }
  auto against_inputs = [&](const auto& o, const char* on) {
    check_no_overlap(o, on, q, "q");
    check_no_overlap(o, on, k, "k");
    check_no_overlap(o, on, v, "v");
    check_no_overlap(o, on, dout, "dout");
    if (state_in) {
      check_no_overlap(o, on, state_in->s, "state s");
      check_no_overlap(o, on, state_in->z, "state z");
    }
  };
  against_inputs(dq, "dq");
  against_inputs(dk, "dk");
  against_inputs(dv, "dv");
  check_no_overlap(dq, "dq", dk, "dk");
  check_no_overlap(dq, "dq", dv, "dv");
  check_no_overlap(dk, "dk", dv, "dv");
  if (dstate) {
    for (const auto* o : {&dstate->s}) {
      against_inputs(*o, "dstate s");
      check_no_overlap(*o, "dstate s", dq, "dq");
      check_no_overlap(*o, "dstate s", dk, "dk");
      check_no_overlap(*o, "dstate s", dv, "dv");
      check_no_overlap(*o, "dstate s", dstate->z, "dstate z");
    }
    against_inputs(dstate->z, "dstate z");
    check_no_overlap(dstate->z, "dstate z", dq, "dq");
    check_no_overlap(dstate->z, "dstate z", dk, "dk");
    check_no_overlap(dstate->z, "dstate z", dv, "dv");
  }
  linear_backward<Acc, std::remove_cv_t<Q>, std::remove_cv_t<K>, std::remove_cv_t<V>,
                  std::remove_cv_t<DO>>(q, k, v, dout, dq, dk, dv, s, f, map, state_in, dstate,
                                        opt);
}

}  // namespace detail

/// Gradients of linear_attention(q, k, v, out, feature_map, options) for the
/// loss gradient dout: writes dq, dk, dv (shapes of q, k, v). The feature map
/// must give its derivative (elu_plus_one(), relu()). Nothing of the forward
/// is needed: the sums are recomputed.
template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Map>
void linear_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                               const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                               const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                               const TensorView<DV, 4>& dv, const Map& feature_map,
                               const LinearAttentionOptions& options = {}) {
  using Acc = detail::accum_t<Q, K, V, DO>;
  detail::linear_backward_entry(q, k, v, dout, dq, dk, dv, feature_map,
                                static_cast<const LinearState<Acc>*>(nullptr),
                                static_cast<const LinearState<Acc>*>(nullptr), options);
}

/// Gradients of the state form of linear_attention. `state_in` holds the
/// state the forward started from (keep a copy: the forward updates its state
/// in place); `dstate` holds dL/d(state after the call) on entry and
/// dL/d(state before the call) on return, so pieces of a sequence are
/// differentiated last piece first.
template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Map, class Acc>
void linear_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                               const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                               const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                               const TensorView<DV, 4>& dv, const Map& feature_map,
                               const LinearState<Acc>& state_in, const LinearState<Acc>& dstate,
                               const LinearAttentionOptions& options = {}) {
  detail::linear_backward_entry(q, k, v, dout, dq, dk, dv, feature_map, &state_in, &dstate,
                                options);
}

}  // namespace attn
