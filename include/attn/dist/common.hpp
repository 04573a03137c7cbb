// attn/dist/common.hpp — what ring and all-to-all attention share: the
// options, argument checks that agree across ranks, and mask / score
// modifier adapters that map a rank's local indices to global ones.
#pragma once

#include "attn/dist/shard.hpp"
#include "attn/mask.hpp"
#include "attn/masked.hpp"
#include "attn/options.hpp"
#include "attn/score_mod.hpp"
#include "attn/tensor_view.hpp"

#include <mpi.h>

#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace attn {
namespace dist {

/// Where one call spent its time, for benchmarks (seconds, this rank).
struct RingTimings {
  double compute = 0;       ///< local attention and merges
  double compute_cpu = 0;   ///< CPU seconds of this process during compute (all its threads):
                            ///< follows the work even when other programs share the cores
  double exposed_comm = 0;  ///< waiting for transfers after the step's compute was done
  double total = 0;         ///< the whole call, checks included
  int steps = 0;            ///< ring steps run (transfers + 1)
  int computed_steps = 0;   ///< steps whose key slice the mask did not rule out
  std::int64_t bytes_sent = 0;
};

/// Options of the distributed entry points: those of every attention call
/// (scale, threads per rank, tiles, lse of this rank's queries [B, Hq, Lq_local])
/// plus how the sequence is laid out across ranks.
struct DistOptions : AttentionOptions {
  /// contiguous (any lengths, in rank order) or zigzag (see attn/dist/shard.hpp).
  SeqLayout layout = SeqLayout::contiguous;
  /// Optional output: where this rank's time went.
  RingTimings* timings = nullptr;
};

namespace detail {

inline int comm_rank(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}
inline int comm_size(MPI_Comm comm) {
  int p = 0;
  MPI_Comm_size(comm, &p);
  return p;
}

/// The runs of global positions a rank holds, in local order.
inline std::vector<Chunk> runs_of(SeqLayout layout, index_t global_len, index_t local_begin,
                                  index_t local_len, int rank, int ranks) {
  if (layout == SeqLayout::contiguous) return {Chunk{local_begin, local_len}};
  return shard_chunks(global_len, rank, ranks, layout);
}

/// Runs `checks` on this rank, then agrees with every other rank: if any
/// rank's checks threw attn::Error, every rank throws the same Error, with
/// the message of the lowest failing rank. If `fingerprint` is given, the
/// checks set it to a summary of what this rank is about to do; ranks that
/// differ (a mask that is not the same everywhere) fail everywhere too,
/// instead of waiting for messages that never come. Collective.
template <class F>
void agree(MPI_Comm comm, const char* fn, F&& checks, const std::int64_t* fingerprint = nullptr,
           const char* fingerprint_what = "") {
  std::string msg;
  bool failed = false;
  try {
    checks();
  } catch (const Error& e) {
    msg = e.what();
    failed = true;
  }
  const int me = comm_rank(comm), p = comm_size(comm);
  // min over ranks of: the first failing rank, the fingerprint, ~fingerprint (= ~max)
  const std::int64_t fp = fingerprint && !failed ? *fingerprint : 0;
  std::int64_t v[3] = {failed ? me : p, fp, ~fp};
  MPI_Allreduce(MPI_IN_PLACE, v, 3, MPI_INT64_T, MPI_MIN, comm);
  const int first = static_cast<int>(v[0]);
  if (first == p) {
    if (v[1] != ~v[2])  // min != max
      attn::detail::fail(fn, ": ", fingerprint_what,
                         " differs across ranks; every rank must pass the same mask and modifier");
    return;
  }
  const std::string prefix = "attn: ";
  if (msg.compare(0, prefix.size(), prefix) == 0) msg.erase(0, prefix.size());
  int len = me == first ? static_cast<int>(msg.size()) : 0;
  MPI_Bcast(&len, 1, MPI_INT, first, comm);
  msg.resize(static_cast<std::size_t>(len));
  MPI_Bcast(&msg[0], len, MPI_CHAR, first, comm);
  attn::detail::fail(fn, " failed on rank ", first, " of ", p, ": ", msg);
}

/// Type code of a storage element, so ranks can compare what they hold.
template <class T>
constexpr std::int64_t type_code() {
  using U = std::remove_cv_t<T>;
  return std::is_same<U, float>::value             ? 1
         : std::is_same<U, double>::value          ? 2
         : std::is_same<U, Eigen::half>::value     ? 3
         : std::is_same<U, Eigen::bfloat16>::value ? 4
                                                   : 0;
}

/// What each rank says about its arguments; gathered and compared.
struct Descriptor {
  enum Field {
    lq,
    lk,
    batch,
    q_heads,
    kv_heads,
    d,
    dv,
    tq,
    tk,
    tv,
    to,
    layout,
    has_lse,
    has_scale,
    scale_bits,
    count
  };
  std::array<std::int64_t, count> f{};
};
inline const char* field_name(int i) {
  static const char* names[] = {"Lq",
                                "Lk",
                                "batch",
                                "q heads",
                                "kv heads",
                                "head dim D",
                                "head dim Dv",
                                "q element type",
                                "k element type",
                                "v element type",
                                "out element type",
                                "layout",
                                "lse given",
                                "scale given",
                                "scale"};
  return names[i];
}

/// Gathers every rank's descriptor.
inline std::vector<Descriptor> allgather(MPI_Comm comm, const Descriptor& mine) {
  std::vector<Descriptor> all(static_cast<std::size_t>(comm_size(comm)));
  MPI_Allgather(mine.f.data(), Descriptor::count, MPI_INT64_T, all.data(), Descriptor::count,
                MPI_INT64_T, comm);
  return all;
}

/// Every field but the lengths must match rank 0's.
inline void check_same_everywhere(const std::vector<Descriptor>& all) {
  for (std::size_t r = 1; r < all.size(); ++r)
    for (int i = Descriptor::batch; i < Descriptor::count; ++i)
      if (all[r].f[static_cast<std::size_t>(i)] != all[0].f[static_cast<std::size_t>(i)])
        attn::detail::fail("the ", field_name(i), " is ", all[r].f[static_cast<std::size_t>(i)],
                           " on rank ", r, " but ", all[0].f[static_cast<std::size_t>(i)],
                           " on rank 0; every rank must pass the same shapes, types and options");
}

template <class Q, class K, class V, class O>
Descriptor describe(const TensorView<Q, 4>& q, const TensorView<K, 4>& k, const TensorView<V, 4>&,
                    const TensorView<O, 4>&, const AttentionShape& s, const DistOptions& opt) {
  Descriptor d;
  auto& f = d.f;
  f[Descriptor::lq] = s.lq;
  f[Descriptor::lk] = s.lk;
  f[Descriptor::batch] = s.batch;
  f[Descriptor::q_heads] = q.extent(1);
  f[Descriptor::kv_heads] = k.extent(1);
  f[Descriptor::d] = s.d;
  f[Descriptor::dv] = s.dv;
  f[Descriptor::tq] = type_code<Q>();
  f[Descriptor::tk] = type_code<K>();
  f[Descriptor::tv] = type_code<V>();
  f[Descriptor::to] = type_code<O>();
  f[Descriptor::layout] = static_cast<std::int64_t>(opt.layout);
  f[Descriptor::has_lse] = opt.lse.is_null() ? 0 : 1;
  f[Descriptor::has_scale] = opt.scale ? 1 : 0;
  if (opt.scale) {
    const double sc = *opt.scale;
    std::memcpy(&f[Descriptor::scale_bits], &sc, sizeof sc);
  }
  return d;
}

/// A message of `bytes` must fit MPI's int count.
inline int message_count(std::int64_t bytes, const char* what) {
  if (bytes > INT_MAX)
    attn::detail::fail(what, " is ", bytes, " bytes, more than one MPI message holds (", INT_MAX,
                       "); use more ranks or a smaller batch");
  return static_cast<int>(bytes);
}

// ------------------------------------------------------ local → global heads --
// Sequence positions go through AttentionOptions::positions; heads have no such
// option, so the all-to-all, whose ranks hold Hq/p of the heads, maps them here.

/// A mask bound to the whole problem, seen by a call that holds heads
/// [h0, h0 + H_local): local head h is global head h + h0.
template <class M>
struct HeadShiftedMask : MaskPolicy {
  static constexpr bool always_full = M::always_full;
  M inner;
  index_t h0 = 0;

  HeadShiftedMask bind(const AttentionShape&) const { return *this; }
  template <class F>
  void for_each_view(F&& f) const {
    attn::detail::for_each_view(inner, f);
  }
  bool keep(index_t b, index_t h, index_t q, index_t k) const {
    return inner.keep(b, h + h0, q, k);
  }
  KeyRange key_range(index_t b, index_t h, index_t q0, index_t q1) const {
    return inner.key_range(b, h + h0, q0, q1);
  }
  template <class M2 = M>
  auto row_keys(index_t b, index_t h, index_t q) const
      -> decltype(std::declval<const M2&>().row_keys(b, h, q), KeyRange{}) {
    return inner.row_keys(b, h + h0, q);
  }
  template <class M2 = M>
  auto next_key(index_t b, index_t h, index_t q0, index_t q1, index_t k) const
      -> decltype(std::declval<const M2&>().next_key(b, h, q0, q1, k)) {
    return inner.next_key(b, h + h0, q0, q1, k);
  }
  template <class M2 = M>
  auto query_range(index_t b, index_t h, index_t k0, index_t k1) const
      -> decltype(std::declval<const M2&>().query_range(b, h, k0, k1)) {
    return inner.query_range(b, h + h0, k0, k1);
  }
  TileKind classify(index_t b, index_t h, index_t q0, index_t q1, index_t k0, index_t k1) const {
    return inner.classify(b, h + h0, q0, q1, k0, k1);
  }
};

/// M::unit_grad, or false for a modifier without a derivative (forward only).
template <class M, class = void>
struct unit_grad_of : std::false_type {};
template <class M>
struct unit_grad_of<M, std::enable_if_t<M::unit_grad>> : std::true_type {};

/// The same for a score modifier (its derivative too, for the backward).
template <class M>
struct HeadShiftedMod : ScoreModPolicy {
  static constexpr bool is_identity = M::is_identity;
  static constexpr bool unit_grad = unit_grad_of<M>::value;
  M inner;
  index_t h0 = 0;

  HeadShiftedMod bind(const AttentionShape&) const { return *this; }
  template <class F>
  void for_each_view(F&& f) const {
    attn::detail::for_each_view(inner, f);
  }
  template <class Acc>
  Acc operator()(index_t b, index_t h, index_t q, index_t k, Acc s) const {
    return inner(b, h + h0, q, k, s);
  }
  template <class Acc>
  void apply_tile(index_t b, index_t h, index_t q0, index_t k0, Acc* s, index_t ld, index_t rows,
                  index_t cols) const {
    inner.apply_tile(b, h + h0, q0, k0, s, ld, rows, cols);
  }
  template <class Acc>
  Acc grad(index_t b, index_t h, index_t q, index_t k, Acc x, Acc g) const {
    return inner.grad(b, h + h0, q, k, x, g);
  }
  template <class Acc>
  void grad_tile(index_t b, index_t h, index_t q0, index_t k0, const Acc* x, Acc* g, index_t ld,
                 index_t rows, index_t cols) const {
    inner.grad_tile(b, h + h0, q0, k0, x, g, ld, rows, cols);
  }
};

template <class M>
HeadShiftedMask<M> head_shifted_mask(const M& bound, index_t h0) {
  HeadShiftedMask<M> m;
  m.inner = bound;
  m.h0 = h0;
  return m;
}
template <class M>
HeadShiftedMod<M> head_shifted_mod(const M& bound, index_t h0) {
  HeadShiftedMod<M> m;
  m.inner = bound;
  m.h0 = h0;
  return m;
}

/// Dropout is not applied across ranks: refused, not ignored.
inline void check_no_dropout(const AttentionOptions& opt, const char* fn) {
  if (opt.dropout.p != 0)
    attn::detail::fail(fn, ": options.dropout.p is ", opt.dropout.p,
                       "; the distributed calls do not apply dropout (set p = 0)");
}

/// The distributed calls place every piece themselves.
inline void check_no_positions(const AttentionOptions& opt, const char* fn) {
  const Positions& p = opt.positions;
  if (p.q_offset != 0 || p.k_offset != 0 || p.q_length != 0 || p.k_length != 0)
    attn::detail::fail(fn, ": options.positions is {", p.q_offset, ", ", p.k_offset, ", ",
                       p.q_length, ", ", p.k_length,
                       "}; leave it default, the call places each rank's slice itself");
}

// ------------------------------------------------- backward: what both share --

/// Whether a score modifier has gradient outputs (additive_bias with dbias).
template <class Mod>
bool writes_grad(const Mod& mod) {
  bool any = false;
  attn::detail::for_each_grad_view(mod, [&](const auto&, const char*) { any = true; });
  return any;
}

/// What the distributed backward calls refuse, on this rank's arguments.
inline void check_backward_options(const DistOptions& options, const char* fn) {
  check_no_positions(options, fn);
  if (options.dropout.enabled())
    attn::detail::fail(fn, ": options.dropout.p is ", options.dropout.p,
                       "; the distributed backward does not apply dropout (set p = 0)");
}
template <class Mod>
void check_no_bias_grad(const Mod& bound_mod, const char* fn) {
  if (writes_grad(bound_mod))
    attn::detail::fail(fn,
                       ": the score modifier has a gradient output (dbias); the distributed "
                       "backward does not write it (use additive_bias without dbias)");
}

/// Every rank's element types of lse, dout, dq, dk, dv (collective). They
/// decide message sizes, so they must agree: check_grad_types compares them.
template <class L, class DO, class DQ, class DK, class DV>
std::vector<std::int64_t> gather_grad_types(MPI_Comm comm) {
  const std::int64_t mine[5] = {type_code<L>(), type_code<DO>(), type_code<DQ>(), type_code<DK>(),
                                type_code<DV>()};
  std::vector<std::int64_t> types(static_cast<std::size_t>(5 * comm_size(comm)));
  MPI_Allgather(mine, 5, MPI_INT64_T, types.data(), 5, MPI_INT64_T, comm);
  return types;
}
inline void check_grad_types(const std::vector<std::int64_t>& types) {
  static const char* names[5] = {"lse", "dout", "dq", "dk", "dv"};
  for (std::size_t r = 1; r < types.size() / 5; ++r)
    for (std::size_t i = 0; i < 5; ++i)
      if (types[5 * r + i] != types[i])
        attn::detail::fail("the ", names[i], " element type differs on rank ", r,
                           " from rank 0's; every rank must pass the same types");
}

/// Accumulation type of a distributed call: double if any operand is double.
template <class... T>
using dist_accum_t =
    std::conditional_t<(std::is_same<std::remove_cv_t<T>, double>::value || ...), double, float>;

/// Static checks every distributed entry point makes.
template <class Q, class K, class V, class O, class Mask, class Mod>
constexpr void static_checks() {
  static_assert(type_code<Q>() && type_code<K>() && type_code<V>() && type_code<O>(),
                "attn::dist: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(!std::is_const<O>::value, "attn::dist: the output view must be writable");
  static_assert(is_mask_v<Mask>, "attn::dist: the mask argument must be a mask policy");
  static_assert(is_score_mod_v<Mod>, "attn::dist: the score_mod argument must be a score modifier");
}

/// Static checks every distributed backward makes.
template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV,
          class Mask, class Mod>
constexpr void static_backward_checks() {
  static_checks<Q, K, V, DQ, Mask, Mod>();  // out is an input here; dq an output
  static_assert(
      type_code<O>() && type_code<DO>() && type_code<DQ>() && type_code<DK>() && type_code<DV>(),
      "attn::dist: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(std::is_same<std::remove_cv_t<L>, float>::value ||
                    std::is_same<std::remove_cv_t<L>, double>::value,
                "attn::dist: lse is float (what the forward writes) or double");
  static_assert(!std::is_const<DQ>::value && !std::is_const<DK>::value && !std::is_const<DV>::value,
                "attn::dist: the gradient views dq, dk, dv must be writable");
}

}  // namespace detail
}  // namespace dist
}  // namespace attn
