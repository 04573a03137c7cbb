// attn/kv/packed.hpp — keys and values in the kernels' layouts, packed once per call.
//
// The score kernel reads keys as panels of NR keys and the P·V kernel reads
// values as rows of dvp columns (kernels/pack.hpp); on AVX512-BF16 both come
// in bf16 pairs. A call whose query tiles or GQA query heads read the same
// keys more than once packs each (batch, KV head) once, for the whole call:
// a copy the size of K and V (O(N·D), never O(N²)), made by the workers
// before the walks start. Otherwise (one query tile, no GQA: decoding) each
// key tile is packed where it is used, into the worker's scratch, so K and V
// are read once either way.
//
// Tile starts: a walk's key tiles begin on multiples of `tile_align` keys (a
// multiple of every panel width), so a tile's panels sit whole in the pack.
//
// Sources: strided views (kv/strided.hpp) are packed straight from their
// strides (and in bf16 pairs on AVX512-BF16); any other source (a segment of a
// sequence, a paged or quantised cache) hands over each tile in the
// accumulation type through its keys()/values() calls, and that tile is packed.
#pragma once

#include "attn/core/memory.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/kernels/dispatch.hpp"
#include "attn/kernels/pack.hpp"
#include "attn/kv/quant.hpp"
#include "attn/kv/strided.hpp"
#include "attn/tensor_view.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace attn {
namespace detail {

/// The storage of a call's packed keys and values. Left uninitialised (the
/// pack writes every element it holds), and, from 4 MiB on, on transparent
/// huge pages (core/memory.hpp): the first touch of a
/// 32 MiB pack then takes 16 page faults instead of 8192, which cost more
/// than packing it on the VMs measured (bench_kinds, topk/qk_engine).
template <class T>
class PackStore {
 public:
  void resize(std::size_t n) {
    data_.reset();
    size_ = n;
    if (n == 0) return;
    void* p = allocate_large(n * sizeof(T));
    data_.reset(static_cast<T*>(p));
  }
  T* data() const { return data_.get(); }
  bool empty() const { return size_ == 0; }
  std::size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  std::size_t size_ = 0;
};

/// Where the packed keys and values of one tile are.
template <class Acc>
struct PackedTile {
  const Acc* k = nullptr;             // fp panels (score kernel)
  const Acc* v = nullptr;             // fp rows, ld = ldv
  const std::uint16_t* kb = nullptr;  // bf16 pair panels
  const std::uint16_t* vb = nullptr;  // bf16 key pairs
  index_t ldv = 0;
  // k holds keys as rows (ld ldk, which may be 0 for a broadcast view) for the
  // score_rows kernel, not panels
  bool k_rows = false;
  index_t ldk = 0;
  // rows read in place in runs (RowRun): of Acc (score_rows, pv) or int8
  // (score_rows_i8, pv_i8, the values' scales folded into P)
  const RowRun* kr = nullptr;
  const RowRun* vr = nullptr;
  index_t k_runs = 0, v_runs = 0;
  bool int8 = false;
};

/// What the packing knows of a source: strided views, or tiles on request.
template <class Src>
struct SourceTraits {
  static constexpr bool strided = false;
  using K = void;
  using V = void;
};
template <class K_, class V_>
struct SourceTraits<StridedKV<K_, V_>> {
  static constexpr bool strided = true;
  using K = K_;
  using V = V_;
};

/// The call-wide layout of packed keys and values, and the pack itself when
/// the call packs once (`whole`).
template <class Acc, class Src>
struct PackedKV {
  static constexpr bool strided = SourceTraits<Src>::strided;
  using K = typename SourceTraits<Src>::K;
  using V = typename SourceTraits<Src>::V;
  using value_type = V;  // void for sources that are not strided views
  static constexpr index_t tile_align = 32;
  /// bf16 storage on an AVX512-BF16 CPU: products on bf16 pairs.
  static constexpr bool bf16_storage = std::is_same<K, Eigen::bfloat16>::value &&
                                       std::is_same<V, Eigen::bfloat16>::value &&
                                       std::is_same<Acc, float>::value;

  const Src& src;
  const kernels::KernelSet<Acc>& ks;
  bool bf16;          // products on bf16 pairs (avx512_bf16 kernels)
  bool amx = false;   // and those on AMX tiles (amx_bf16 kernels, same layouts)
  index_t d, dv;      // head dims
  index_t dvp;        // padded Dv (kernels::padded_dv)
  index_t dpad;       // bf16: D rounded up to even
  index_t nr;         // keys per K panel
  bool v_in_place;    // fp values read straight from the view
  bool whole;         // packed once for the call (else per tile)
  bool rows = false;  // keys read as rows by score_rows (few query rows; sources that are
                      // not strided views): no K panels; values in place when dv = dvp
  index_t kv_heads, k_slice, v_slice;
  PackStore<Acc> k, v;  // the call's packs (when `whole`)
  PackStore<std::uint16_t> kb, vb;

  /// kv_heads: Hkv of the source (packs of a whole call are per (batch, KV head)).
  PackedKV(const Src& s, const kernels::KernelSet<Acc>& kset, bool use_bf16, index_t d_,
           index_t dv_, index_t bc, bool reused, index_t kv_heads_)
      : src(s), ks(kset), bf16(use_bf16), d(d_), dv(dv_), dvp(kernels::padded_dv(dv_)),
        dpad(d_ + (d_ & 1)), nr(use_bf16 ? 32 : kset.k_panel),
        v_in_place(in_place_values(s, use_bf16, dv_, dvp)), whole(reused && bc % nr == 0),
        kv_heads(kv_heads_),
        k_slice(use_bf16 ? kernels::packed_kb_size(s.length(), d_)
                         : kernels::packed_k_size(s.length(), d_, static_cast<int>(nr))),
        v_slice((s.length() + 1) / 2 * 2 * dvp) {}

  /// Elements of K (fp or bf16) and V of one tile of up to `keys` keys (scratch sizes).
  index_t tile_k_size(index_t keys) const {
    return bf16 ? kernels::packed_kb_size(keys, d)
                : kernels::packed_k_size(keys, d, static_cast<int>(nr));
  }
  index_t tile_v_size(index_t keys) const { return (keys + 1) / 2 * 2 * dvp; }

  /// fp values read straight from a strided view, with no pack.
  static bool in_place_values(const Src& s, bool use_bf16, index_t dv_, index_t dvp_) {
    if constexpr (strided)
      return !use_bf16 && std::is_same<V, Acc>::value && s.v.stride(3) == 1 && dv_ == dvp_;
    (void)s, (void)use_bf16, (void)dv_, (void)dvp_;
    return false;
  }

  /// Rows a `gather` buffer needs for a tile of `keys` keys (sources that are not strided
  /// views hand tiles over in it): (keys, max(D, Dv)).
  RowMatrix<Acc> gather_buffer(index_t keys) const {
    return strided ? RowMatrix<Acc>() : RowMatrix<Acc>(keys, std::max(d, dv));
  }

  /// Packs keys [k0, k0 + cols) of (b, hk) to k / kb at `ko` and values to v / vb at `vo`.
  void pack(index_t b, index_t hk, index_t k0, index_t cols, Acc* row, Acc* kp, Acc* vp,
            std::uint16_t* kbp, std::uint16_t* vbp, RowMatrix<Acc>& gather) const {
    if constexpr (!strided) {
      (void)kbp, (void)vbp;
      index_t ld = 0;
      const Acc* kt = src.template keys<Acc>(b, hk, k0, cols, gather, ld);
      kernels::pack_k(ks, kt, ld, index_t{1}, cols, d, row, kp);
      const Acc* vt = src.template values<Acc>(b, hk, k0, cols, gather, ld);
      kernels::pack_v(ks, vt, ld, index_t{1}, cols, dv, dvp, vp);
    } else {
      (void)gather;
      pack_strided(b, hk, k0, cols, row, kp, vp, kbp, vbp);
    }
  }

  /// Keys [k0, k0 + cols) of (b, hk) as rows for score_rows (in the source or
  /// converted into `gk`), and values as rows: in place (or converted into `gv`)
  /// when Dv needs no padding, else packed to `vp`. Sources that are not strided views.
  /// Caches whose rows are int8 or already Acc hand them over as runs in place
  /// (into k_runs, v_runs: room for `cols` each) when Dv needs no padding: no
  /// copy of the tile, and a paged cache reads every number as a contiguous one.
  PackedTile<Acc> load_rows(index_t b, index_t hk, index_t k0, index_t cols, Acc* vp,
                            RowMatrix<Acc>& gk, RowMatrix<Acc>& gv, RowRun* k_runs,
                            RowRun* v_runs) const {
    PackedTile<Acc> t;
    using E = run_rows_t<Src>;
    if constexpr (std::is_same<E, std::int8_t>::value || std::is_same<E, Acc>::value) {
      if (dv == dvp) {
        src.key_runs(b, hk, k0, cols, [&](index_t c0, index_t n, const E* r, const float* sc) {
          k_runs[t.k_runs++] = {c0, n, r, sc};
        });
        src.value_runs(b, hk, k0, cols, [&](index_t c0, index_t n, const E* r, const float* sc) {
          v_runs[t.v_runs++] = {c0, n, r, sc};
        });
        t.kr = k_runs;
        t.vr = v_runs;
        t.int8 = std::is_same<E, std::int8_t>::value;
        return t;
      }
    }
    (void)k_runs, (void)v_runs;
    if constexpr (!strided) {
      index_t ld = 0;
      t.k = src.template keys<Acc>(b, hk, k0, cols, gk, ld);
      t.k_rows = true;
      t.ldk = ld;
      const Acc* vt = src.template values<Acc>(b, hk, k0, cols, gv, ld);
      if (dv == dvp) {
        t.v = vt;
        t.ldv = ld;
      } else {
        kernels::pack_v(ks, vt, ld, index_t{1}, cols, dv, dvp, vp);
        t.v = vp;
        t.ldv = dvp;
      }
    } else {
      (void)b, (void)hk, (void)k0, (void)cols, (void)vp, (void)gk, (void)gv;
    }
    return t;
  }

  void pack_strided(index_t b, index_t hk, index_t k0, index_t cols, Acc* row, Acc* kp, Acc* vp,
                    std::uint16_t* kbp, std::uint16_t* vbp) const {
    const K* ks_ = src.k.data() + b * src.k.stride(0) + hk * src.k.stride(1) + k0 * src.k.stride(2);
    const V* vs_ = src.v.data() + b * src.v.stride(0) + hk * src.v.stride(1) + k0 * src.v.stride(2);
    if constexpr (bf16_storage) {
      if (bf16) {
        kernels::pack_kb(ks_, src.k.stride(2), src.k.stride(3), cols, d, kbp);
        kernels::pack_vb(vs_, src.v.stride(2), src.v.stride(3), cols, dv, dvp, vbp);
        return;
      }
    }
    (void)kbp;
    (void)vbp;
    kernels::pack_k(ks, ks_, src.k.stride(2), src.k.stride(3), cols, d, row, kp);
    if (!v_in_place) kernels::pack_v(ks, vs_, src.v.stride(2), src.v.stride(3), cols, dv, dvp, vp);
  }

  /// Packs the whole call on `threads` workers (when `whole`).
  void pack_all(index_t batch, int requested_threads) {
    if (!whole) return;
    const index_t slices = batch * kv_heads;
    const auto size = [&](bool used, index_t slice) {
      return used ? static_cast<std::size_t>(slices * slice) : std::size_t{0};
    };
    k.resize(size(!bf16, k_slice));
    v.resize(size(!bf16 && !v_in_place, v_slice));
    kb.resize(size(bf16, k_slice));
    vb.resize(size(bf16, v_slice));
    const index_t chunk = 1024;  // keys per packing task, a multiple of every panel width
    const index_t chunks = (src.length() + chunk - 1) / chunk;
    const index_t tasks = slices * chunks;
    struct Scratch {
      std::vector<Acc> row;
      RowMatrix<Acc> gather;
    };
    parallel_tasks(
        tasks, resolve_threads(requested_threads, tasks),
        [&] {
          return std::make_unique<Scratch>(
              Scratch{std::vector<Acc>(static_cast<std::size_t>(d)), gather_buffer(chunk)});
        },
        [&](Scratch& sc, index_t t) {
          const index_t slice = t / chunks, k0 = (t % chunks) * chunk;
          const index_t ko = k_offset(slice, k0), vo = v_offset(slice, k0);
          pack(slice / kv_heads, slice % kv_heads, k0, std::min(chunk, src.length() - k0),
               sc.row.data(), at(k, ko), at(v, vo), at(kb, ko), at(vb, vo), sc.gather);
        },
        [](const Scratch&) {});
  }

  index_t length() const { return src.length(); }

  /// Element `off` of a pack, null for a pack this call does not use.
  template <class Vec>
  static auto at(Vec& pack, index_t off) {
    return pack.empty() ? nullptr : pack.data() + off;
  }
  /// Offsets of key k0 (a multiple of tile_align) of slice b·Hkv + hk in the K and V packs.
  index_t k_offset(index_t slice, index_t k0) const {
    return slice * k_slice + k0 * (bf16 ? dpad : d);
  }
  index_t v_offset(index_t slice, index_t k0) const { return slice * v_slice + k0 * dvp; }

  /// The call's packed tile at key k0 (a multiple of tile_align) of (b, hk).
  PackedTile<Acc> tile_at(index_t b, index_t hk, index_t k0) const {
    const index_t slice = b * kv_heads + hk, ko = k_offset(slice, k0), vo = v_offset(slice, k0);
    return {at(k, ko), at(v, vo), at(kb, ko), at(vb, vo), dvp};
  }
};

}  // namespace detail
}  // namespace attn
