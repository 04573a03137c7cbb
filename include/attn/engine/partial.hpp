// attn/engine/partial.hpp — the partial result of softmax attention over a set of keys.
//
// For each query row of a tile the engine keeps
//
//   O (unnormalised output, Dv)   m (running max of the scores)   l (Σ exp(s - m))
//
// A key tile updates them online; finalize writes out = O / l and
// lse = m + log(l). Two partial results over disjoint key sets merge exactly
// by their log-sum-exp (merge_row), which split-KV decoding, ring attention
// and callers combining caches rest on.
#pragma once

#include "attn/detail/softmax.hpp"
#include "attn/tensor_view.hpp"

#include "attn/core/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace attn {
namespace detail {

template <class Acc>
struct Partial {
  static constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  RowMatrix<Acc> o;  // (Br, dvp) unnormalised output; columns past Dv stay zero
  Eigen::Array<Acc, Eigen::Dynamic, 1> m;  // (Br) running row max
  Eigen::Array<Acc, Eigen::Dynamic, 1> l;  // (Br) running Σ exp(s - m)
  index_t rows = 0;
  index_t dv = 0;

  /// `dvp` >= dv columns of O: the kernels' padded width (kernels::padded_dv).
  Partial(index_t br, index_t dv_, index_t dvp) : o(br, dvp), m(br), l(br), dv(dv_) {}
  Partial(index_t br, index_t dv_) : Partial(br, dv_, dv_) {}

  /// Starts `r` rows that have seen no key.
  void reset(index_t r) {
    rows = r;
    o.topRows(r).setZero();
    m.head(r).setConstant(neg_inf);
    l.head(r).setZero();
  }

  /// Online softmax of one score tile, a row at a time while it is in L1:
  ///   m' = max(m, rowmax(S));  P = exp(S - m');  l = l·exp(m - m') + rowsum(P);  O = O·exp(m - m')
  /// On return `s` holds P, ready for O += P·V.
  void update(Acc* s, index_t lds, index_t cols) {
    for (index_t r = 0; r < rows; ++r) {
      Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> row(s + r * lds, cols);
      const Acc m_old = m(r);
      const Acc m_new = std::max(m_old, row.maxCoeff());
      const Acc m_use = m_new == neg_inf ? Acc(0) : m_new;  // a row with nothing seen yet stays 0
      if (m_old != m_new) {
        const Acc alpha = std::exp(m_old - m_use);  // 0 when m_old = -inf
        l(r) *= alpha;
        o.row(r) *= alpha;
      }
      l(r) += exp_shift_sum(row.data(), cols, m_use);
      m(r) = m_new;
    }
  }

  /// Row r's log-sum-exp: m + log(l), -inf for a row that saw no key (NaN stays NaN).
  Acc lse(index_t r) const { return l(r) == Acc(0) ? neg_inf : m(r) + std::log(l(r)); }

  /// out row r = O / l (zeros for a row that saw no key; a NaN score keeps the row NaN).
  template <class Row>
  void write_row(index_t r, Row&& dst) const {
    const Acc inv = l(r) == Acc(0) ? Acc(0) : Acc(1) / l(r);
    dst = (o.row(r).head(dv) * inv).template cast<typename std::decay_t<Row>::Scalar>();
  }
};

/// Merges the normalised partial (out_b, lse_b) over a key set disjoint from
/// that of (out_a, lse_a) into (out_a, lse_a), for one row of `n` values:
///   lse = logaddexp(lse_a, lse_b);  out = out_a·exp(lse_a - lse) + out_b·exp(lse_b - lse)
/// A side with lse = -inf saw no key and contributes nothing; both -inf gives
/// zeros and -inf. Computed in Acc.
template <class Acc, class TA, class TB, class LA, class LB>
void merge_row(TA* out_a, index_t stride_a, LA& lse_a, const TB* out_b, index_t stride_b, LB lse_b,
               index_t n) {
  const Acc la = static_cast<Acc>(lse_a), lb = static_cast<Acc>(lse_b);
  constexpr Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  if (lb == neg_inf) return;  // b saw nothing (also when both saw nothing)
  Acc wa, wb, lse;
  if (la == neg_inf) {
    wa = 0;
    wb = 1;
    lse = lb;
  } else {
    // |la - lb| is NaN when either is, and then so are lse and both weights.
    lse = std::max(la, lb) + std::log1p(std::exp(-std::abs(la - lb)));
    wa = std::exp(la - lse);
    wb = std::exp(lb - lse);
  }
  for (index_t i = 0; i < n; ++i) {
    const Acc a = wa == Acc(0) ? Acc(0) : static_cast<Acc>(out_a[i * stride_a]) * wa;
    out_a[i * stride_a] = static_cast<TA>(a + static_cast<Acc>(out_b[i * stride_b]) * wb);
  }
  lse_a = static_cast<LA>(lse);
}

}  // namespace detail
}  // namespace attn
