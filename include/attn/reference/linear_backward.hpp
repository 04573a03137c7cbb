// attn/reference/linear_backward.hpp — naive gradients of linear attention
// in double, the oracle of attn::linear_attention_backward.
//
// Per (batch, query head) it forms the full A = φ(Q) φ(K)ᵀ (entries a query
// does not see zeroed), num = φ(Q) S0 + A V, den = φ(Q) z0 + A 1 + eps,
// out = num / den, and differentiates that expression directly:
//   gn = dout / den,  gd = -rowsum(dout ∘ num) / den²,  dA = gn Vᵀ + gd 1ᵀ
//   dφ(Q) = dA φ(K) + gn S0ᵀ + gd z0ᵀ,  dφ(K) = dAᵀ φ(Q),  dV = Aᵀ gn
//   dS0 = φ(Q)ᵀ gn,  dz0 = φ(Q)ᵀ gd
// plus, per (batch, KV head), the final state S0 + φ(K)ᵀ V, z0 + φ(K)ᵀ 1
// against dstate; then dq = dφ(Q) ∘ φ'(q), dk = dφ(K) ∘ φ'(k).
#pragma once

#include "attn/linear.hpp"
#include "attn/linear/backward.hpp"
#include "attn/tensor_view.hpp"

#include <Eigen/Core>

namespace attn {
namespace reference {

template <class Q, class K, class V, class DO, class DQ, class DK, class DV, class Map>
void linear_attention_backward(const TensorView<Q, 4>& q, const TensorView<K, 4>& k,
                               const TensorView<V, 4>& v, const TensorView<DO, 4>& dout,
                               const TensorView<DQ, 4>& dq, const TensorView<DK, 4>& dk,
                               const TensorView<DV, 4>& dv, const Map& map,
                               const LinearAttentionOptions& opt = {},
                               const LinearState<double>* state_in = nullptr,
                               const LinearState<double>* dstate = nullptr) {
  static_assert(detail::has_feature_derivative<Map>::value,
                "attn: the reference needs a feature map with derivative(x)");
  index_t f = 0;
  const AttentionShape s = detail::check_linear(q, k, v, dout, map, state_in, opt, f);
  using M = RowMatrix<double>;
  const index_t g = s.q_heads / s.kv_heads;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t hk = 0; hk < s.kv_heads; ++hk) {
      const M kd = matrix(k, b, hk).template cast<double>();
      const M vd = matrix(v, b, hk).template cast<double>();
      M phik(s.lk, f);
      map.template keys<double>(
          FeatureInput<double>(kd.data(), s.lk, s.d, Eigen::OuterStride<>(s.d)),
          FeatureOutput<double>(phik.data(), s.lk, f, Eigen::OuterStride<>(f)));
      M s0 = M::Zero(f, s.dv), ds = M::Zero(f, s.dv);
      Eigen::RowVectorXd z0 = Eigen::RowVectorXd::Zero(f), dz = Eigen::RowVectorXd::Zero(f);
      if (state_in)
        for (index_t r = 0; r < f; ++r) {
          for (index_t c = 0; c < s.dv; ++c) s0(r, c) = state_in->s(b, hk, r, c);
          z0(r) = state_in->z(b, hk, r);
        }
      M dphik = M::Zero(s.lk, f), dvd = M::Zero(s.lk, s.dv);
      if (dstate) {  // the final state S0 + φ(K)ᵀ V, z0 + φ(K)ᵀ 1
        M gs(f, s.dv);
        Eigen::RowVectorXd gz(f);
        for (index_t r = 0; r < f; ++r) {
          for (index_t c = 0; c < s.dv; ++c) gs(r, c) = dstate->s(b, hk, r, c);
          gz(r) = dstate->z(b, hk, r);
        }
        dphik += vd * gs.transpose();
        dphik.rowwise() += gz;
        dvd += phik * gs;
        ds += gs;
        dz += gz;
      }
      for (index_t hg = 0; hg < g; ++hg) {
        const index_t h = hk * g + hg;
        const M qd = matrix(q, b, h).template cast<double>();
        const M od = matrix(dout, b, h).template cast<double>();
        M phiq(s.lq, f);
        map.template keys<double>(
            FeatureInput<double>(qd.data(), s.lq, s.d, Eigen::OuterStride<>(s.d)),
            FeatureOutput<double>(phiq.data(), s.lq, f, Eigen::OuterStride<>(f)));
        M a = phiq * phik.transpose();  // (Lq, Lk)
        if (opt.causal)
          for (index_t i = 0; i < s.lq; ++i)
            for (index_t j = std::max<index_t>(0, i + s.diagonal_offset() + 1); j < s.lk; ++j)
              a(i, j) = 0;
        const M num = phiq * s0 + a * vd;
        const Eigen::VectorXd den =
            (phiq * z0.transpose()) + a.rowwise().sum() + Eigen::VectorXd::Constant(s.lq, opt.eps);
        M gn(s.lq, s.dv);
        Eigen::VectorXd gd(s.lq);
        for (index_t i = 0; i < s.lq; ++i) {
          gn.row(i) = od.row(i) / den(i);
          gd(i) = -od.row(i).dot(num.row(i)) / (den(i) * den(i));
        }
        M da = gn * vd.transpose();
        da.colwise() += gd;
        if (opt.causal)
          for (index_t i = 0; i < s.lq; ++i)
            for (index_t j = std::max<index_t>(0, i + s.diagonal_offset() + 1); j < s.lk; ++j)
              da(i, j) = 0;
        const M dphiq = da * phik + gn * s0.transpose() + gd * z0;
        dphik += da.transpose() * phiq;
        dvd += a.transpose() * gn;
        ds += phiq.transpose() * gn;
        dz += gd.transpose() * phiq;
        for (index_t i = 0; i < s.lq; ++i)
          for (index_t c = 0; c < s.d; ++c)
            dq(b, h, i, c) =
                static_cast<std::remove_cv_t<DQ>>(dphiq(i, c) * map.derivative(qd(i, c)));
      }
      for (index_t j = 0; j < s.lk; ++j) {
        for (index_t c = 0; c < s.d; ++c)
          dk(b, hk, j, c) = static_cast<DK>(dphik(j, c) * map.derivative(kd(j, c)));
        for (index_t c = 0; c < s.dv; ++c) dv(b, hk, j, c) = static_cast<DV>(dvd(j, c));
      }
      if (dstate)
        for (index_t r = 0; r < f; ++r) {
          for (index_t c = 0; c < s.dv; ++c) dstate->s(b, hk, r, c) = ds(r, c);
          dstate->z(b, hk, r) = dz(r);
        }
    }
}

}  // namespace reference
}  // namespace attn
