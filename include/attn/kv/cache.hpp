// attn/kv/cache.hpp — a contiguous key/value cache for incremental decoding.
//
// One KVCache holds the keys and values of one attention layer for B
// sequences: K [B, Hkv, capacity, D], V [B, Hkv, capacity, Dv], and the number
// of tokens each sequence holds. Tokens are appended (prefill: many at once;
// decode: one per step); attention reads the first length(b) rows of
// sequence b in place (attn/kv/attention.hpp). Element types: float, double,
// Eigen::half, Eigen::bfloat16, and std::int8_t with a float scale per
// (token, head) (attn/kv/quant.hpp).
#pragma once

#include "attn/core/memory.hpp"
#include "attn/detail/checks.hpp"
#include "attn/kv/quant.hpp"
#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace attn {

namespace detail {

/// Checks the [n_seq, Hkv, n, D] / [n_seq, Hkv, n, Dv] pair to append; returns n.
template <class U, class W>
index_t check_append_views(const TensorView<U, 4>& k, const TensorView<W, 4>& v, index_t n_seq,
                           index_t kv_heads, index_t d, index_t dv) {
  check_view(k, "k");
  check_view(v, "v");
  if (k.extent(0) != n_seq || k.extent(1) != kv_heads || k.extent(3) != d)
    fail("k has shape ", shape_str(k), ", expected [", n_seq, ", ", kv_heads, ", n, ", d,
         "] (sequences, kv heads, new tokens, head dim)");
  if (v.extent(0) != n_seq || v.extent(1) != kv_heads || v.extent(2) != k.extent(2) ||
      v.extent(3) != dv)
    fail("v has shape ", shape_str(v), ", expected [", n_seq, ", ", kv_heads, ", ", k.extent(2),
         ", ", dv, "] (sequences, kv heads, new tokens, value head dim)");
  return k.extent(2);
}

/// int8 caches need finite inputs (a scale of inf or NaN cannot be stored).
template <class T, class U>
void check_finite_for(const TensorView<U, 4>& x, const char* name) {
  if constexpr (is_quantized_v<T>) {
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        for (index_t l = 0; l < x.extent(2); ++l)
          for (index_t c = 0; c < x.extent(3); ++c)
            if (!std::isfinite(static_cast<double>(x(b, h, l, c))))
              fail(name, "(", b, ", ", h, ", ", l, ", ", c, ") is ",
                   static_cast<double>(x(b, h, l, c)), "; an int8 cache stores finite values only");
  } else {
    (void)x;
    (void)name;
  }
}

}  // namespace detail

/// Keys and values of B sequences of one layer, stored [B, Hkv, capacity, D].
template <class T>
class KVCache {
  static_assert(detail::is_cache_type_v<T>,
                "attn::KVCache holds float, double, Eigen::half, Eigen::bfloat16 or std::int8_t");

 public:
  /// Empty cache of B sequences with room for `capacity` tokens each;
  /// head_dim_v = 0 means head_dim.
  KVCache(index_t batch, index_t kv_heads, index_t capacity, index_t head_dim,
          index_t head_dim_v = 0)
      : batch_(batch), heads_(kv_heads), cap_(capacity), d_(head_dim),
        dv_(head_dim_v == 0 ? head_dim : head_dim_v) {
    if (batch <= 0) detail::fail("KVCache batch is ", batch, ", must be > 0");
    if (kv_heads <= 0) detail::fail("KVCache kv_heads is ", kv_heads, ", must be > 0");
    if (capacity <= 0) detail::fail("KVCache capacity is ", capacity, ", must be > 0");
    if (head_dim <= 0) detail::fail("KVCache head_dim is ", head_dim, ", must be > 0");
    if (head_dim_v < 0) detail::fail("KVCache head_dim_v is ", head_dim_v, ", must be >= 0");
    const auto rows = static_cast<std::size_t>(batch_ * heads_ * cap_);
    k_.assign(rows * static_cast<std::size_t>(d_), T(0));
    v_.assign(rows * static_cast<std::size_t>(dv_), T(0));
    if constexpr (detail::is_quantized_v<T>) {
      k_scale_.assign(rows, 0.0f);
      v_scale_.assign(rows, 0.0f);
    }
    len_.assign(static_cast<std::size_t>(batch_), 0);
  }

  index_t batch() const { return batch_; }
  index_t kv_heads() const { return heads_; }
  index_t capacity() const { return cap_; }
  index_t head_dim() const { return d_; }
  index_t head_dim_v() const { return dv_; }
  /// Tokens held by sequence b.
  index_t length(index_t b) const {
    check_seq(b);
    return len_[static_cast<std::size_t>(b)];
  }
  const std::vector<index_t>& lengths() const { return len_; }
  /// Bytes of K and V storage (and scales), whatever the lengths.
  std::size_t bytes() const {
    return (k_.size() + v_.size()) * sizeof(T) +
           (k_scale_.size() + v_scale_.size()) * sizeof(float);
  }

  /// Appends n tokens to every sequence: k [B, Hkv, n, D], v [B, Hkv, n, Dv],
  /// any storage type and strides. Throws attn::Error (nothing written) on a
  /// shape mismatch or when a sequence would pass the capacity.
  template <class U, class W>
  void append(const TensorView<U, 4>& k, const TensorView<W, 4>& v) {
    const index_t n = detail::check_append_views(k, v, batch_, heads_, d_, dv_);
    for (index_t b = 0; b < batch_; ++b) check_room(b, n);
    check_inputs(k, v);
    for (index_t b = 0; b < batch_; ++b) write(b, b, k, v, n);
  }

  /// Appends n tokens to sequence `seq`: k [1, Hkv, n, D], v [1, Hkv, n, Dv].
  template <class U, class W>
  void append(index_t seq, const TensorView<U, 4>& k, const TensorView<W, 4>& v) {
    check_seq(seq);
    const index_t n = detail::check_append_views(k, v, 1, heads_, d_, dv_);
    check_room(seq, n);
    check_inputs(k, v);
    write(seq, 0, k, v, n);
  }

  /// Forgets the tokens of sequence b past `length` (0: all of them).
  void truncate(index_t b, index_t length) {
    check_seq(b);
    if (length < 0 || length > len_[static_cast<std::size_t>(b)])
      detail::fail("truncate length ", length, " of sequence ", b, " is outside [0, ",
                   len_[static_cast<std::size_t>(b)], "]");
    len_[static_cast<std::size_t>(b)] = length;
  }
  /// Empties every sequence.
  void clear() { std::fill(len_.begin(), len_.end(), 0); }

  /// The whole storage, [B, Hkv, capacity, D] and [B, Hkv, capacity, Dv]
  /// (rows past length(b) hold stale data).
  TensorView<const T, 4> keys() const { return bhsd<const T>(k_.data(), batch_, heads_, cap_, d_); }
  TensorView<const T, 4> values() const {
    return bhsd<const T>(v_.data(), batch_, heads_, cap_, dv_);
  }
  /// Sequence b's tokens: [1, Hkv, length(b), D] (length 0 gives extent 0).
  TensorView<const T, 4> keys(index_t b) const { return seq_view(k_.data(), b, d_); }
  TensorView<const T, 4> values(index_t b) const { return seq_view(v_.data(), b, dv_); }
  /// int8 caches: the scale of each (sequence, head, token) row, [B, Hkv, capacity].
  TensorView<const float, 3> key_scales() const { return scale_view(k_scale_); }
  TensorView<const float, 3> value_scales() const { return scale_view(v_scale_); }

 private:
  void check_seq(index_t b) const {
    if (b < 0 || b >= batch_) detail::fail("sequence ", b, " is outside [0, ", batch_, ")");
  }
  void check_room(index_t b, index_t n) const {
    const index_t len = len_[static_cast<std::size_t>(b)];
    if (len + n > cap_)
      detail::fail("appending ", n, " tokens to sequence ", b, " of length ", len,
                   " passes the KVCache capacity ", cap_);
  }
  template <class U, class W>
  void check_inputs(const TensorView<U, 4>& k, const TensorView<W, 4>& v) const {
    detail::check_no_overlap(keys(), "the cache's keys", k, "k");
    detail::check_no_overlap(values(), "the cache's values", v, "v");
    detail::check_no_overlap(keys(), "the cache's keys", v, "v");
    detail::check_no_overlap(values(), "the cache's values", k, "k");
    detail::check_finite_for<T>(k, "k");
    detail::check_finite_for<T>(v, "v");
  }
  template <class U, class W>
  void write(index_t b, index_t src_b, const TensorView<U, 4>& k, const TensorView<W, 4>& v,
             index_t n) {
    const index_t len = len_[static_cast<std::size_t>(b)];
    for (index_t h = 0; h < heads_; ++h)
      for (index_t t = 0; t < n; ++t) {
        const index_t row = (b * heads_ + h) * cap_ + len + t;
        const float sk =
            detail::store_row(&k(src_b, h, t, 0), k.stride(3), d_, k_.data() + row * d_);
        const float sv =
            detail::store_row(&v(src_b, h, t, 0), v.stride(3), dv_, v_.data() + row * dv_);
        if constexpr (detail::is_quantized_v<T>) {
          k_scale_[static_cast<std::size_t>(row)] = sk;
          v_scale_[static_cast<std::size_t>(row)] = sv;
        }
      }
    len_[static_cast<std::size_t>(b)] = len + n;
  }
  TensorView<const T, 4> seq_view(const T* base, index_t b, index_t dim) const {
    check_seq(b);
    return TensorView<const T, 4>(base + b * heads_ * cap_ * dim,
                                  {1, heads_, len_[static_cast<std::size_t>(b)], dim},
                                  {heads_ * cap_ * dim, cap_ * dim, dim, 1});
  }
  TensorView<const float, 3> scale_view(const std::vector<float>& s) const {
    if (s.empty()) return {};
    return TensorView<const float, 3>(s.data(), {batch_, heads_, cap_});
  }

  index_t batch_, heads_, cap_, d_, dv_;
  std::vector<T, detail::LargeAllocator<T>> k_, v_;  // huge pages (core/memory.hpp)
  std::vector<float> k_scale_, v_scale_;
  std::vector<index_t> len_;
};

}  // namespace attn
