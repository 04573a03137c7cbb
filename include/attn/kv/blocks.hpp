// attn/kv/blocks.hpp — keys and values read from a cache through block tables.
//
// One source type serves both caches: a PagedKVCache is a pool of blocks of
// block_size tokens, and a contiguous KVCache is the same thing with one block
// of `capacity` tokens per sequence. Token t of sequence s lives in slot
// t % block_size of block table_s[t / block_size], and block i of the pool
// holds [Hkv, block_size, D] keys (and values, and for int8 a float scale per
// (block, head, slot)).
//
// The walk asks for a tile of keys [k0, k0 + rows) of (sequence, kv head):
//  - a float (double) tile inside one block is read in place: (pointer, ld = D);
//  - a tile that spans blocks is copied block by block into the worker's tile
//    buffer (the buffer half and bfloat16 keys are converted into), never the
//    sequence;
//  - int8 rows are dequantised into the tile buffer: x = scale · x̂.
// The products that follow read the same numbers either way, so a paged cache
// gives the same bits as a contiguous one holding the same tokens.
#pragma once

#include "attn/kernels/dispatch.hpp"
#include "attn/kv/quant.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <type_traits>

namespace attn {
namespace detail {

template <class T>
struct BlockKV {
  const T* k = nullptr;            // pool [blocks, Hkv, bs, D]
  const T* v = nullptr;            // pool [blocks, Hkv, bs, Dv]
  const float* k_scale = nullptr;  // [blocks, Hkv, bs] for int8
  const float* v_scale = nullptr;
  index_t heads = 0, bs = 0, d = 0, dv = 0;
  const index_t* const* tables = nullptr;  // tables[s]: blocks of sequence s
  const index_t* lengths = nullptr;        // lengths[s]: tokens of sequence s
  index_t len = 0;                         // keys the walk may ask for (any sequence)

  index_t length() const { return len; }
  template <class Acc>
  bool packs_keys() const {
    return true;  // tiles spanning blocks need the buffer
  }
  template <class Acc>
  bool packs_values() const {
    return true;
  }
  /// Keys (values) [k0, k0 + rows) of (s, hk) as runs that each lie in one block:
  /// f(first column, count, first row, its scale) in key order (int8 pools).
  template <class F>
  void key_runs(index_t s, index_t hk, index_t k0, index_t rows, F&& f) const {
    runs(k, k_scale, d, s, hk, k0, rows, f);
  }
  template <class F>
  void value_runs(index_t s, index_t hk, index_t k0, index_t rows, F&& f) const {
    runs(v, v_scale, dv, s, hk, k0, rows, f);
  }
  template <class Acc>
  const Acc* keys(index_t s, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                  index_t& ld) const {
    return tile<Acc>(k, k_scale, d, s, hk, k0, rows, pack, ld);
  }
  template <class Acc>
  const Acc* values(index_t s, index_t hk, index_t k0, index_t rows, RowMatrix<Acc>& pack,
                    index_t& ld) const {
    return tile<Acc>(v, v_scale, dv, s, hk, k0, rows, pack, ld);
  }

 private:
  template <class Acc>
  const Acc* tile(const T* pool, const float* scale, index_t dim, index_t s, index_t hk, index_t k0,
                  index_t rows, RowMatrix<Acc>& pack, index_t& ld) const {
    if constexpr (std::is_same<T, Acc>::value) {
      if (k0 / bs == (k0 + rows - 1) / bs) {  // inside one block: in place
        ld = dim;
        return pool + pool_row(s, hk, k0) * dim;
      }
    }
    // int8 rows: the conversion of the instruction set the call runs (the same bits on each).
    const auto i8_to_float = kernels::kernel_set<float>(active_isa()).i8_to_float;
    (void)i8_to_float;
    runs(pool, scale, dim, s, hk, k0, rows,
         [&](index_t c0, index_t n, const T* first, const float* first_scale) {
           for (index_t i = 0; i < n; ++i) {
             const T* src = first + i * dim;
             Acc* dst = pack.data() + (c0 + i) * dim;
             if constexpr (is_quantized_v<T> && std::is_same<Acc, float>::value) {
               i8_to_float(src, first_scale[i], dst, dim);
             } else if constexpr (is_quantized_v<T>) {
               const Acc sc = static_cast<Acc>(first_scale[i]);
               for (index_t c = 0; c < dim; ++c) dst[c] = sc * static_cast<Acc>(src[c]);
             } else {
               (void)first_scale;
               for (index_t c = 0; c < dim; ++c) dst[c] = static_cast<Acc>(src[c]);
             }
           }
         });
    ld = dim;
    return pack.data();
  }

  /// The pool row of token t of sequence s, KV head hk.
  index_t pool_row(index_t s, index_t hk, index_t t) const {
    return (tables[s][t / bs] * heads + hk) * bs + t % bs;
  }

  /// Rows [k0, k0 + rows) of (s, hk) in runs inside one block each (scales null
  /// for pools that have none).
  template <class F>
  void runs(const T* pool, const float* scale, index_t dim, index_t s, index_t hk, index_t k0,
            index_t rows, F&& f) const {
    for (index_t t = k0; t < k0 + rows;) {
      const index_t run = std::min(k0 + rows, (t / bs + 1) * bs) - t;  // tokens left in t's block
      const index_t r0 = pool_row(s, hk, t);
      f(t - k0, run, pool + r0 * dim, scale ? scale + r0 : nullptr);
      t += run;
    }
  }
};

template <class T>
struct run_rows<BlockKV<T>> {
  using type = T;
};

}  // namespace detail
}  // namespace attn
