// fuzz/fuzz_bytes.hpp — how every fuzz target reads its input.
#pragma once

#include <attn/tensor_view.hpp>

#include <cstddef>
#include <cstdint>

namespace attn_fuzz {

/// Reads the fuzz input a byte at a time; zeros once it runs out.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  std::uint8_t byte() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  /// An integer in [lo, hi].
  attn::index_t range(attn::index_t lo, attn::index_t hi) {
    return lo + static_cast<attn::index_t>(byte()) % (hi - lo + 1);
  }
  bool flag() { return byte() & 1; }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
};

}  // namespace attn_fuzz
