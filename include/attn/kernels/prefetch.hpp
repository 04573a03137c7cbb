// attn/kernels/prefetch.hpp — software prefetch of byte ranges into L2, and the
// look-ahead of the kernels that stream rows (score_rows, pv with few rows),
// shared by every instruction set's copy of the kernels (body.inl) and by the
// walk, which hands those kernels a paged cache's next run of rows.
#pragma once

#include "attn/tensor_view.hpp"  // index_t

#include <algorithm>

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

/// Rows a kernel that streams a few query rows over rows of keys or values
/// (score_rows, pv with few rows) prefetches ahead of the one it reads: about
/// 4 KiB, the bytes a thread must have in flight to cover a DRAM round trip at
/// its share of the bandwidth. The hardware prefetchers stop at 4 KiB pages,
/// and a decoding tile of int8 rows (32 KiB) crosses eight of them.
inline index_t stream_ahead(index_t row_bytes) {
  return std::max<index_t>(4, 4096 / std::max<index_t>(row_bytes, 1));
}

/// Where a streaming kernel's rows go on after its last one: the next run of
/// rows of a paged cache (`n` rows at `rows`, the call's row stride), so the
/// kernel's look-ahead runs on into it at the distance it keeps inside a run,
/// a few lines per step among the products. Prefetched only, never read.
/// Empty: the stream ends with the call. (A burst of a whole 8 KiB run asked
/// for at once takes every line-fill buffer and stalls the products behind it:
/// 16% of a paged decoding step on a Xeon, even with the cache in L3.)
struct NextRows {
  const void* rows = nullptr;
  index_t n = 0;
};

/// Row j of a stream whose rows [0, cols) start at `base` (ld elements apart)
/// and go on in `next`; null past both. Rows [j, j + count) must lie in one of
/// the two, or null (a block that straddles them is not prefetched).
template <class E>
inline const E* stream_rows(const E* base, index_t ld, index_t cols, NextRows next, index_t j,
                            index_t count = 1) {
  if (j + count <= cols) return base + j * ld;
  if (j < cols) return nullptr;
  j -= cols;
  return j + count <= next.n ? static_cast<const E*>(next.rows) + j * ld : nullptr;
}

}  // namespace kernels
}  // namespace attn
