// attn/dist/shard.hpp — how a sequence is split across ranks, and helpers
// that copy a whole sequence into one rank's shard and back. No MPI here.
//
// contiguous: rank r holds one run of the sequence. shard() splits N as
//             evenly as it can (rank r starts at floor(r·N/p)); ring_attention
//             also takes any other lengths, one run per rank in rank order.
// zigzag:     the sequence is cut into 2p equal chunks and rank r holds
//             chunks r and 2p−1−r, in that order. Under a causal mask every
//             rank then does the same work (a contiguous split gives the last
//             rank p times the work of the first). N must divide by 2p.
#pragma once

#include "attn/options.hpp"
#include "attn/tensor_view.hpp"

#include <array>
#include <cstddef>
#include <vector>

namespace attn {
namespace dist {

/// Where each rank's part of the sequence lies.
enum class SeqLayout { contiguous, zigzag };

inline const char* layout_name(SeqLayout l) {
  return l == SeqLayout::zigzag ? "zigzag" : "contiguous";
}

/// A run of `length` global positions starting at `begin`.
struct Chunk {
  index_t begin = 0;
  index_t length = 0;
};

/// The runs rank `rank` of `ranks` holds of a sequence of `n`, in local
/// order (one run for contiguous, two for zigzag). Throws attn::Error when
/// the layout cannot split n (zigzag needs n divisible by 2·ranks).
inline std::vector<Chunk> shard_chunks(index_t n, int rank, int ranks, SeqLayout layout) {
  if (ranks <= 0 || rank < 0 || rank >= ranks)
    attn::detail::fail("shard: rank ", rank, " is outside [0, ranks = ", ranks, ")");
  if (n < 0) attn::detail::fail("shard: sequence length is ", n, ", must be >= 0");
  if (layout == SeqLayout::contiguous) {
    const index_t b = n * rank / ranks, e = n * (rank + 1) / ranks;
    return {Chunk{b, e - b}};
  }
  if (n % (2 * static_cast<index_t>(ranks)) != 0)
    attn::detail::fail("shard: the zigzag layout cuts the sequence into 2·ranks = ", 2 * ranks,
                       " equal chunks, but the length ", n, " does not divide by ", 2 * ranks);
  const index_t c = n / (2 * static_cast<index_t>(ranks));
  return {Chunk{rank * c, c}, Chunk{(2 * static_cast<index_t>(ranks) - 1 - rank) * c, c}};
}

/// Length of rank `rank`'s shard of a sequence of `n`.
inline index_t shard_length(index_t n, int rank, int ranks, SeqLayout layout) {
  index_t len = 0;
  for (const Chunk& c : shard_chunks(n, rank, ranks, layout)) len += c.length;
  return len;
}

namespace detail {
/// Copies the sequence rows (dimension 2) of `chunks` between a whole
/// sequence and one shard; to_shard picks the direction.
template <class F, class S, int R>
void copy_chunks(const TensorView<F, R>& full, const TensorView<S, R>& local,
                 const std::vector<Chunk>& chunks, bool to_shard) {
  static_assert(R == 3 || R == 4, "attn::dist::shard: views are [B, H, L] or [B, H, L, D]");
  const index_t dim = R == 4 ? full.extent(R - 1) : 1;
  index_t row = 0;
  for (const Chunk& c : chunks) {
    for (index_t b = 0; b < full.extent(0); ++b)
      for (index_t h = 0; h < full.extent(1); ++h)
        for (index_t l = 0; l < c.length; ++l)
          for (index_t d = 0; d < dim; ++d) {
            index_t fo = b * full.stride(0) + h * full.stride(1) + (c.begin + l) * full.stride(2);
            index_t so = b * local.stride(0) + h * local.stride(1) + (row + l) * local.stride(2);
            if constexpr (R == 4) {
              fo += d * full.stride(3);
              so += d * local.stride(3);
            }
            if (to_shard)
              local.data()[so] = static_cast<S>(full.data()[fo]);
            else
              full.data()[fo] = static_cast<F>(local.data()[so]);
          }
    row += c.length;
  }
}

template <class F, class S, int R>
void check_shard_views(const TensorView<F, R>& full, const TensorView<S, R>& local, index_t len,
                       const char* fn) {
  for (int i = 0; i < R; ++i)
    if (i != 2 && full.extent(i) != local.extent(i))
      attn::detail::fail(fn, ": the whole sequence has extent ", full.extent(i), " in dimension ",
                         i, ", the shard ", local.extent(i));
  if (local.extent(2) != len)
    attn::detail::fail(fn, ": the shard has length ", local.extent(2), ", but this rank holds ",
                       len, " of the sequence of ", full.extent(2));
}
}  // namespace detail

/// Copies rank `rank`'s part of `full` ([B, H, N, D] or [B, H, N]) into
/// `local` ([B, H, shard_length, D] or [B, H, shard_length]).
template <class F, class S, int R>
void shard(const TensorView<F, R>& full, const TensorView<S, R>& local, int rank, int ranks,
           SeqLayout layout) {
  const auto chunks = shard_chunks(full.extent(2), rank, ranks, layout);
  detail::check_shard_views(full, local, shard_length(full.extent(2), rank, ranks, layout),
                            "shard");
  detail::copy_chunks(full, local, chunks, true);
}

/// The inverse of shard(): writes rank `rank`'s part `local` back into its
/// positions of `full`. Calling it for every rank's shard rebuilds `full`.
template <class F, class S, int R>
void unshard(const TensorView<S, R>& local, const TensorView<F, R>& full, int rank, int ranks,
             SeqLayout layout) {
  const auto chunks = shard_chunks(full.extent(2), rank, ranks, layout);
  detail::check_shard_views(full, local, shard_length(full.extent(2), rank, ranks, layout),
                            "unshard");
  detail::copy_chunks(full, local, chunks, false);
}

}  // namespace dist
}  // namespace attn
