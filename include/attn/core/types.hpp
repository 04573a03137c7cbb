// attn/core/types.hpp — the element types attn stores and the type it accumulates in.
#pragma once

#include "attn/core/eigen.hpp"

#include <type_traits>

namespace attn {
namespace detail {

/// Element types the engine stores and loads.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same<T, float>::value || std::is_same<T, double>::value ||
    std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value;

/// Accumulation type: double if any operand is double, float otherwise
/// (half and bfloat16 storage accumulate in float).
template <class... T>
using accum_t =
    std::conditional_t<(std::is_same<std::remove_cv_t<T>, double>::value || ...), double, float>;

}  // namespace detail
}  // namespace attn
