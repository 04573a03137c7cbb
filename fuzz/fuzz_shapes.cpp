// fuzz/fuzz_shapes.cpp — libFuzzer target: hostile extents, strides and
// pointers for every entry point.
//
// Each input decodes a small valid problem whose tensors (q, k, v, out, lse,
// an additive bias) all live in one float arena, then mutates a few of their
// extents, strides or pointers to values from a hostile table: 0, -1, 2^31,
// 2^32, 2^62, INT64_MAX, INT64_MIN, and strides that wrap (mod 2^64 bytes)
// onto another tensor. The exact element span of every view is computed in
// 128 bits, and the target aborts when
//   - a view whose byte span does not fit 64 bits, with a non-positive extent
//     or with null data is accepted,
//   - a refused call wrote any byte of the arena,
//   - an accepted call wrote a byte outside its output views, or its output
//     differs from the fp64 reference;
// and the sanitizers report any memory error or undefined behaviour (which
// the checks themselves must not cause). Views that fit 64 bits but lie
// outside the arena are never passed (the library cannot know a buffer's
// size; such a call is the caller's bug, not a hostile input it can refuse).
//
// Build and run: scripts/ci-fuzz.sh (builds every fuzz/fuzz_*.cpp).
//
// Compiled with ATTN_FUZZ_MPI defined (fuzz/fuzz_dist.cpp does that, linked
// with MPI), the same inputs also reach attn::dist::ring_attention and
// attn::dist::ulysses_attention on a one-rank communicator: their argument
// checks, which every rank agrees on, must hold the same promises.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>
#ifdef ATTN_FUZZ_MPI
#include <attn/dist/ring.hpp>
#include <attn/dist/ulysses.hpp>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

using attn::index_t;
__extension__ typedef __int128 i128;

using attn_fuzz::Bytes;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_shapes: %s\n", what.c_str());
  std::abort();
}

constexpr index_t kArena = 8192;  // floats

/// A view under construction: offset into the arena (or null), extents, strides.
template <int R>
struct Spec {
  bool null = false;
  index_t offset = 0;
  std::array<index_t, R> shape{}, strides{};
  bool used = false;  // does the chosen entry point read or write it?

  /// Contiguous at `offset`.
  void contiguous(index_t off, const std::array<index_t, R>& s) {
    offset = off;
    shape = s;
    index_t st = 1;
    for (int i = R - 1; i >= 0; --i) {
      strides[i] = st;
      st *= s[i];
    }
  }
  /// Element offsets [lo, hi] in 128 bits, each term saturated at ±2^100 (far
  /// past any span that fits 64 bits) so that four of them cannot overflow.
  void span(i128& lo, i128& hi) const {
    const i128 cap = i128{1} << 100;
    lo = hi = 0;
    for (int i = 0; i < R; ++i) {
      const i128 s = std::clamp((static_cast<i128>(shape[i]) - 1) * strides[i], -cap, cap);
      (s < 0 ? lo : hi) += s;
    }
  }
  bool extents_positive() const {
    for (index_t e : shape)
      if (e <= 0) return false;
    return true;
  }
  /// The byte span does not fit a 64-bit signed integer.
  bool overflows() const {
    i128 lo, hi;
    span(lo, hi);
    const i128 lim = std::numeric_limits<index_t>::max();
    return lo * 4 < -lim - 1 || (hi + 1) * 4 > lim;
  }
  /// Every element lies inside the arena.
  bool inside() const {
    i128 lo, hi;
    span(lo, hi);
    return offset + lo >= 0 && offset + hi < kArena;
  }
  /// The library must refuse it.
  bool refusable() const { return !extents_positive() || null || overflows(); }
};

/// Hostile replacements for an extent or a stride.
index_t hostile(Bytes& in, index_t current) {
  static const index_t table[] = {0,
                                  -1,
                                  1,
                                  2,
                                  3,
                                  index_t{1} << 31,
                                  index_t{1} << 32,
                                  index_t{1} << 62,
                                  (index_t{1} << 62) + 1,
                                  std::numeric_limits<index_t>::max(),
                                  std::numeric_limits<index_t>::min(),
                                  -(index_t{1} << 62)};
  const auto i = in.range(0, 12);
  if (i == 12)  // -current, modulo 2^64 (the minimum negates to itself)
    return static_cast<index_t>(std::uint64_t{0} - static_cast<std::uint64_t>(current));
  return table[i];
}

struct World {
  std::vector<float> arena;
  Spec<4> q, k, v, out, bias;
  Spec<3> lse;
  index_t B = 1, Hq = 1, Hkv = 1, Lq = 1, Lk = 1, D = 1, Dv = 1;
  int entry = 0;

  template <int R>
  attn::TensorView<float, R> view(const Spec<R>& s) {
    return attn::TensorView<float, R>(s.null ? nullptr : arena.data() + s.offset, s.shape,
                                      s.strides);
  }
  template <int R>
  attn::TensorView<const float, R> cview(const Spec<R>& s) {
    return view(s);
  }
};

/// Mutates one extent, stride or pointer of `s`; `others` are offsets of the
/// other tensors (targets of wrapping strides).
template <int R>
void mutate(Spec<R>& s, Bytes& in, const std::vector<index_t>& others) {
  const int dim = static_cast<int>(in.range(0, R - 1));
  switch (in.range(0, 4)) {
    case 0:
      s.shape[dim] = hostile(in, s.shape[dim]);
      break;
    case 1:
      s.strides[dim] = hostile(in, s.strides[dim]);
      break;
    case 2: {  // a stride that lands on another tensor modulo 2^64 bytes
      const index_t target = others[static_cast<std::size_t>(in.range(0, 5)) % others.size()];
      s.strides[dim] =
          target - s.offset + (in.byte() & 1 ? (index_t{1} << 62) : -(index_t{1} << 62));
      break;
    }
    case 3:
      s.null = true;
      break;
    default:  // move it onto another tensor (an honest alias)
      s.offset = others[static_cast<std::size_t>(in.range(0, 5)) % others.size()];
      break;
  }
}

template <class F>
bool refused(F&& call, std::string& msg) {
  try {
    call();
  } catch (const attn::Error& e) {
    msg = e.what();
    return true;
  }
  return false;
}

double at(const std::vector<float>& a, const Spec<4>& s, index_t b, index_t h, index_t i,
          index_t c) {
  return a[static_cast<std::size_t>(s.offset + b * s.strides[0] + h * s.strides[1] +
                                    i * s.strides[2] + c * s.strides[3])];
}

#ifdef ATTN_FUZZ_MPI
constexpr index_t kEntries = 8;  // 6: ring_attention, 7: ulysses_attention
#else
constexpr index_t kEntries = 6;
#endif

}  // namespace

#ifdef ATTN_FUZZ_MPI
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  MPI_Init(argc, argv);  // a one-rank world; never finalized (libFuzzer ends with exit)
  return 0;
}
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  World w;
  w.entry = static_cast<int>(in.range(0, kEntries - 1));
  w.B = in.range(1, 2);
  w.Hkv = in.range(1, 2);
  w.Hq = w.Hkv * in.range(1, 2);
  w.Lq = in.range(1, 9);
  w.Lk = in.range(1, 9);
  w.D = in.range(1, 6);
  w.Dv = w.entry == 5 ? w.D : in.range(1, 6);
  if (w.entry == 5 && w.D % 2) ++w.D, ++w.Dv;  // RoPE rotates pairs
  // Consecutive tensors, each at a 64-float boundary.
  index_t off = 0;
  auto place = [&](index_t n) {
    const index_t o = off;
    off += (n + 63) / 64 * 64;
    return o;
  };
  w.q.contiguous(place(w.B * w.Hq * w.Lq * w.D), {w.B, w.Hq, w.Lq, w.D});
  w.k.contiguous(place(w.B * w.Hkv * w.Lk * w.D), {w.B, w.Hkv, w.Lk, w.D});
  w.v.contiguous(place(w.B * w.Hkv * w.Lk * w.Dv), {w.B, w.Hkv, w.Lk, w.Dv});
  const index_t out_cols = w.entry == 2 ? w.Lk : w.entry == 5 ? w.D : w.Dv;
  w.out.contiguous(place(w.B * w.Hq * w.Lq * out_cols), {w.B, w.Hq, w.Lq, out_cols});
  w.lse.contiguous(place(w.B * w.Hq * w.Lq), {w.B, w.Hq, w.Lq});
  w.bias.contiguous(place(w.B * w.Hq * w.Lq * w.Lk), {w.B, w.Hq, w.Lq, w.Lk});
  const bool with_lse = in.byte() & 1, with_bias = in.byte() & 1;
  w.q.used = w.k.used = w.entry != 5;
  w.v.used = w.entry != 2 && w.entry != 5;
  w.out.used = true;
  const bool softmax_entry = w.entry == 0 || w.entry == 1 || w.entry == 4 || w.entry >= 6;
  const bool lse_given = with_lse && softmax_entry;
  w.lse.used = lse_given;
  w.bias.used = with_bias && (softmax_entry || w.entry == 2) && w.entry != 1;

  const std::vector<index_t> offsets{w.q.offset,   w.k.offset,   w.v.offset,
                                     w.out.offset, w.lse.offset, w.bias.offset};
  const int mutations = static_cast<int>(in.range(0, 3));
  for (int m = 0; m < mutations; ++m) {
    switch (in.range(0, 5)) {
      case 0:
        mutate(w.q, in, offsets);
        break;
      case 1:
        mutate(w.k, in, offsets);
        break;
      case 2:
        mutate(w.v, in, offsets);
        break;
      case 3:
        mutate(w.out, in, offsets);
        break;
      case 4:
        mutate(w.lse, in, offsets);
        break;
      default:
        mutate(w.bias, in, offsets);
        break;
    }
  }

  // Which views the call sees, and what must happen.
  if (w.lse.null && !w.lse.extents_positive()) w.lse.used = false;  // null and empty: "not given"
  bool must_refuse = false, lying = false;
  auto classify = [&](const auto& s) {
    if (!s.used) return;
    if (s.refusable())
      must_refuse = true;
    else if (!s.inside())
      lying = true;
  };
  classify(w.q), classify(w.k), classify(w.v), classify(w.out), classify(w.lse), classify(w.bias);
  if (lying) return 0;  // a view over memory that is not there: the caller's bug
  attn::Rope rope;      // RoPE positions near 2^63 must be refused when offset + L - 1 overflows
  const std::uint8_t pos = in.byte();
  rope.offset = pos & 1 ? std::numeric_limits<index_t>::max() - (pos >> 1) % 12 : pos;
  if (w.entry == 5 && w.out.shape[2] >= 1 &&  // an empty length is refused for its shape
      rope.offset > std::numeric_limits<index_t>::max() - (w.out.shape[2] - 1))
    must_refuse = true;

  w.arena.resize(kArena);
  std::uint32_t x = static_cast<std::uint32_t>(size) * 2654435761u + 1;  // cheap LCG values
  for (auto& a : w.arena) {
    x = x * 1664525u + 1013904223u;
    a = static_cast<float>(static_cast<int>(x >> 24) - 128) / 64.f;  // in [-2, 2)
  }
  const std::vector<float> before = w.arena;

  attn::AttentionOptions opt;
  opt.num_threads = 1 + (in.byte() & 1);
  if (lse_given) opt.lse = w.view(w.lse);  // also when null and empty ("not given")
  const auto bias = attn::additive_bias(w.cview(w.bias));
  const attn::BlockSparseLayout layout =
      attn::BlockSparseLayout::local(std::max<index_t>(w.Lq, w.Lk), 4, 1, 0);
  std::string msg;
  auto call = [&] {
    const auto q = w.cview(w.q), k = w.cview(w.k), v = w.cview(w.v);
    const auto out = w.view(w.out);
    switch (w.entry) {
      case 0:
        if (with_bias)
          attn::masked_attention(q, k, v, out, attn::causal(), bias, opt);
        else
          attn::masked_attention(q, k, v, out, attn::causal(), opt);
        break;
      case 1:
        attn::scaled_dot_product_attention(q, k, v, out, opt);
        break;
      case 2:
        if (with_bias)
          attn::attention_weights(q, k, out, attn::no_mask(), bias, opt);
        else
          attn::attention_weights(q, k, out);
        break;
      case 3:
        attn::linear_attention(q, k, v, out, attn::elu_plus_one());
        break;
      case 4:
        if (with_bias) {  // (validate refuses a layout whose block counts do not fit)
          attn::sparse_attention(q, k, v, out, layout, attn::no_mask(), bias, opt);
        } else {
          attn::sparse_attention(q, k, v, out, layout, opt);
        }
        break;
      case 5:
        attn::apply_rope(out, rope);
        break;
#ifdef ATTN_FUZZ_MPI
      default: {
        attn::dist::DistOptions dopt;
        static_cast<attn::AttentionOptions&>(dopt) = opt;
        const auto run = [&](const auto& mask, const auto& mod) {
          if (w.entry == 6)
            attn::dist::ring_attention(MPI_COMM_WORLD, q, k, v, out, mask, mod, dopt);
          else
            attn::dist::ulysses_attention(MPI_COMM_WORLD, q, k, v, out, mask, mod, dopt);
        };
        if (with_bias)
          run(attn::causal(), bias);
        else
          run(attn::causal(), attn::NoScoreMod{});
        break;
      }
#endif
    }
  };
  if (refused(call, msg)) {
    if (w.arena != before) fail("refused (" + msg + ") after writing the arena");
    return 0;
  }
  if (must_refuse)
    fail("a view that must be refused was accepted (entry " + std::to_string(w.entry) + ")");

  // Accepted: only the output views' elements changed.
  std::vector<float> expect = before;
  auto copy_back = [&](const auto& s) {  // the written elements, taken from the result
    if (!s.used) return;
    std::array<index_t, 4> idx{};
    const int R = static_cast<int>(s.shape.size());
    std::function<void(int, index_t)> rec = [&](int d, index_t o) {
      if (d == R) {
        expect[static_cast<std::size_t>(o)] = w.arena[static_cast<std::size_t>(o)];
        return;
      }
      for (idx[d] = 0; idx[d] < s.shape[d]; ++idx[d]) rec(d + 1, o + idx[d] * s.strides[d]);
    };
    rec(0, s.offset);
  };
  copy_back(w.out);
  copy_back(w.lse);
  if (expect != w.arena) fail("a byte outside the output views was written");

  // Against the fp64 reference for the softmax entry points.
  if (softmax_entry) {
    std::vector<float> in_copy = before;
    const auto q =
        attn::TensorView<const float, 4>(in_copy.data() + w.q.offset, w.q.shape, w.q.strides);
    const auto k =
        attn::TensorView<const float, 4>(in_copy.data() + w.k.offset, w.k.shape, w.k.strides);
    const auto v =
        attn::TensorView<const float, 4>(in_copy.data() + w.v.offset, w.v.shape, w.v.strides);
    // The accepted views' extents, not the decoded ones: mutations may change
    // both q's and out's length (to a small value from the hostile table) and
    // leave the call consistent.
    const auto& os = w.out.shape;
    std::vector<double> ref(static_cast<std::size_t>(os[0] * os[1] * os[2] * os[3]));
    const auto r = attn::bhsd(ref.data(), os[0], os[1], os[2], os[3]);
    const auto bias_c = attn::additive_bias(attn::TensorView<const float, 4>(
        in_copy.data() + w.bias.offset, w.bias.shape, w.bias.strides));
    if ((w.entry == 0 || w.entry >= 6) && with_bias)
      attn::reference::attention(q, k, v, r, attn::causal(), bias_c);
    else if (w.entry == 0 || w.entry >= 6)
      attn::reference::attention(q, k, v, r, attn::causal());
    else if (w.entry == 1)
      attn::reference::attention(q, k, v, r);
    else if (with_bias)
      attn::reference::attention(q, k, v, r, attn::block_sparse(layout), bias_c);
    else
      attn::reference::attention(q, k, v, r, attn::block_sparse(layout));
    for (index_t b = 0; b < os[0]; ++b)
      for (index_t h = 0; h < os[1]; ++h)
        for (index_t i = 0; i < os[2]; ++i)
          for (index_t c = 0; c < os[3]; ++c) {
            const double x = at(w.arena, w.out, b, h, i, c), y = r(b, h, i, c);
            if (!(std::abs(x - y) <= 1e-4 * (1 + std::abs(y))))
              fail("output differs from the reference: " + std::to_string(x) + " vs " +
                   std::to_string(y));
          }
  }
  return 0;
}
