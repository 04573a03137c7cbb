// attn/kv/strided.hpp — keys and values read from strided [B, Hkv, Lk, D] views.
//
// A key/value source hands the engine's walk one tile of keys or values as
// (pointer, leading dimension) in the accumulation type. The strided source
// reads a view in place when its rows are contiguous and already of that type,
// and converts into the worker's pack buffer otherwise. Other sources (paged
// caches, quantised caches) answer the same two calls.
#pragma once

#include "attn/tensor_view.hpp"

#include <type_traits>

namespace attn {
namespace detail {

/// A tile of a [L, D] slice as (pointer, leading dimension): in place when
/// the storage type is the accumulation type and rows are contiguous,
/// otherwise converted into `pack`.
template <class Acc, class T>
const Acc* load_tile(const TensorView<const T, 4>& t, index_t b, index_t h, index_t row0,
                     index_t rows, RowMatrix<Acc>& pack, index_t& ld) {
  const T* base = t.data() + b * t.stride(0) + h * t.stride(1) + row0 * t.stride(2);
  if constexpr (std::is_same<T, Acc>::value) {
    if (t.stride(3) == 1) {
      ld = t.stride(2);
      return base;
    }
  }
  const index_t cols = t.extent(3);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c)
      pack(r, c) = static_cast<Acc>(base[r * t.stride(2) + c * t.stride(3)]);
  ld = pack.cols();
  return pack.data();
}

/// Keys and values from two strided views (the common source).
template <class K, class V>
struct StridedKV {
  TensorView<const K, 4> k;  // [B, Hkv, Lk, D]
  TensorView<const V, 4> v;  // [B, Hkv, Lk, Dv]

  index_t length() const { return k.extent(2); }
  /// True when a tile of keys (values) must be converted into a pack buffer.
  template <class Acc>
  bool packs_keys() const {
    return !std::is_same<K, Acc>::value || k.stride(3) != 1;
  }
  template <class Acc>
  bool packs_values() const {
    return !std::is_same<V, Acc>::value || v.stride(3) != 1;
  }
  /// Keys [k0, k0 + rows) of (b, hk): (pointer, ld) into the view or `pack`.
  template <class Acc>
  const Acc* keys(index_t b, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                  index_t& ld) const {
    return load_tile<Acc>(k, b, hk, k0, rows, pack, ld);
  }
  template <class Acc>
  const Acc* values(index_t b, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                    index_t& ld) const {
    return load_tile<Acc>(v, b, hk, k0, rows, pack, ld);
  }
};

}  // namespace detail
}  // namespace attn
