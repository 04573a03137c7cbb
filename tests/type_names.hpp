// tests/type_names.hpp — readable names for typed tests ("half" rather than
// "2"), and the third TYPED_TEST_SUITE argument that clang's -Wpedantic wants.
#pragma once

#include <Eigen/Core>

#include <string>
#include <type_traits>

namespace attn_test {

/// gtest name generator: float, double, half, bfloat16.
struct StorageTypeNames {
  template <class T>
  static std::string GetName(int) {
    if (std::is_same<T, float>::value) return "float";
    if (std::is_same<T, double>::value) return "double";
    if (std::is_same<T, Eigen::half>::value) return "half";
    if (std::is_same<T, Eigen::bfloat16>::value) return "bfloat16";
    return "other";
  }
};

}  // namespace attn_test
