// attn/kernels/prefetch.hpp — software prefetch of byte ranges into L2, shared
// by every instruction set's copy of the kernels (body.inl) and by the walk,
// which asks for a paged cache's next run of rows before the kernels read it.
#pragma once

#include "attn/tensor_view.hpp"  // index_t

namespace attn {
namespace kernels {

/// Asks for the cache line at `p` into L2 (a hint: never faults). Streams from
/// DRAM use it: an L1 prefetch holds one of the core's few line-fill buffers for
/// the whole trip and stalls the core once they are all taken.
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

/// Prefetches the n bytes from `p` into L2, one cache line at a time.
inline void prefetch_bytes(const void* p, index_t n) {
  const char* c = static_cast<const char*>(p);
  for (index_t b = 0; b < n; b += 64) prefetch_l2(c + b);
}

}  // namespace kernels
}  // namespace attn
