// attn/tensor_view.hpp — a non-owning strided view: pointer + shape + strides.
//
// Attention tensors are viewed logically as [batch, heads, seq, dim]. The
// strides say where the bytes really are, so a [batch, seq, heads, dim]
// buffer (what most models store) is used without a copy, and a zero stride
// broadcasts a dimension.
#pragma once

#include "attn/core/eigen.hpp"
#include "attn/core/error.hpp"

#include <array>
#include <cstddef>
#include <type_traits>

namespace attn {

/// Signed index type for extents, strides and positions.
using index_t = std::ptrdiff_t;

/// A view of `Rank`-dimensional data of element type `T` (may be const).
/// Extents and strides are in elements. The view never owns its data.
template <class T, int Rank>
class TensorView {
  static_assert(Rank >= 1, "attn::TensorView needs at least one dimension");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using extents_type = std::array<index_t, Rank>;
  static constexpr int rank = Rank;

  /// An empty view: null data, all extents zero. Used for "not given".
  TensorView() = default;

  TensorView(T* data, const extents_type& shape, const extents_type& strides)
      : data_(data), shape_(shape), strides_(strides) {}

  /// Contiguous row-major view (last dimension has stride 1). Throws
  /// attn::Error when a stride (a product of extents) overflows.
  TensorView(T* data, const extents_type& shape) : data_(data), shape_(shape) {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      strides_[i] = s;
      if (i > 0 && !detail::mul_fits(s, shape[i], s))
        detail::fail("a contiguous view of shape ", shape_string(), " has a stride that overflows",
                     " a 64-bit integer (the product of extents ", i, "..", Rank - 1, ")");
    }
  }

  /// A view of T converts to a view of const T.
  template <class U,
            class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
  TensorView(const TensorView<U, Rank>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  T* data() const { return data_; }
  const extents_type& shape() const { return shape_; }
  const extents_type& strides() const { return strides_; }
  index_t extent(int i) const { return shape_[i]; }
  index_t stride(int i) const { return strides_[i]; }

  /// Number of elements (product of extents; 0 when an extent is 0 or
  /// negative). Throws attn::Error when the product overflows.
  index_t size() const {
    index_t n = 1;
    for (index_t e : shape_)
      if (e <= 0) return 0;
    for (index_t e : shape_)
      if (!detail::mul_fits(n, e, n))
        detail::fail("a view of shape ", shape_string(),
                     " has more elements than a 64-bit integer holds");
    return n;
  }
  /// True for a view with null data and no element ("not given", e.g.
  /// default-constructed). Null data with positive extents is not null: the
  /// checks refuse it as a given view with null data.
  bool is_null() const {
    if (data_ != nullptr) return false;
    for (index_t e : shape_)
      if (e <= 0) return true;
    return false;
  }

  /// Offset in elements of the element at `idx`.
  template <class... I>
  index_t offset(I... idx) const {
    static_assert(sizeof...(I) == Rank, "attn::TensorView: one index per dimension");
    const std::array<index_t, Rank> ix{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int i = 0; i < Rank; ++i) off += ix[i] * strides_[i];
    return off;
  }

  template <class... I>
  T& operator()(I... idx) const {
    return data_[offset(idx...)];
  }

 private:
  std::string shape_string() const {
    std::ostringstream os;
    os << '[';
    for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << shape_[i];
    os << ']';
    return os.str();
  }

  T* data_ = nullptr;
  extents_type shape_{};
  extents_type strides_{};
};

/// Rank-4 attention tensor [batch, heads, seq, dim].
template <class T>
using Tensor4 = TensorView<T, 4>;

/// A contiguous [B, H, L, D] buffer, viewed as [B, H, L, D].
template <class T>
TensorView<T, 4> bhsd(T* data, index_t B, index_t H, index_t L, index_t D) {
  return TensorView<T, 4>(data, {B, H, L, D});
}

/// A contiguous [B, L, H, D] buffer, viewed as [B, H, L, D] without a copy.
template <class T>
TensorView<T, 4> bshd(T* data, index_t B, index_t L, index_t H, index_t D) {
  const TensorView<T, 4> c(data, {B, L, H, D});  // checks the products
  return TensorView<T, 4>(data, {B, H, L, D}, {c.stride(0), c.stride(2), c.stride(1), 1});
}

/// Row-major Eigen matrix of `T` (the layout the library computes in).
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Eigen map of a strided 2-D block; const-ness follows `T`.
template <class T>
using StridedMap =
    Eigen::Map<std::conditional_t<std::is_const<T>::value, const RowMatrix<std::remove_cv_t<T>>,
                                  RowMatrix<std::remove_cv_t<T>>>,
               Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

/// The [seq, dim] matrix of batch `b`, head `h` of a rank-4 view, as an
/// Eigen::Map with the view's strides (no copy).
template <class T>
StridedMap<T> matrix(const TensorView<T, 4>& t, index_t b, index_t h) {
  return StridedMap<T>(t.data() + b * t.stride(0) + h * t.stride(1), t.extent(2), t.extent(3),
                       Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(t.stride(2), t.stride(3)));
}

/// A rank-2 view as an Eigen::Map with its strides.
template <class T>
StridedMap<T> matrix(const TensorView<T, 2>& t) {
  return StridedMap<T>(t.data(), t.extent(0), t.extent(1),
                       Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(t.stride(0), t.stride(1)));
}

}  // namespace attn
