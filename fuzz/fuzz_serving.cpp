// fuzz/fuzz_serving.cpp — libFuzzer target: the serving entry points (KV
// caches, paged attention, varlen, split-KV decode, merge_partials) against
// the dense fp64 reference.
//
// Build and run: scripts/ci-fuzz.sh [seconds] fuzz_serving.
// Each input decodes a cache type (float, bfloat16, int8), heads with GQA,
// head dims, a mask (none, causal, window) and modifier (none, ALiBi; float
// caches, under causal), tiles and threads, then a sequence of up to 12 operations on a
// contiguous KVCache and a PagedKVCache that hold the same sequences:
//   - append tokens to a sequence (refused with nothing changed when the
//     contiguous cache's capacity or the paged pool's free blocks run out),
//   - fork a sequence (shares its blocks, copy-on-write), free one, add one,
//   - attend with 1-4 query rows (1-2 rows take the split-KV decode schedule)
//     for a list of sequences: cache_attention against the fp64 reference on
//     the K/V the cache materialises (dequantised for int8) within the
//     float tolerance, and against the reference on the appended (unrounded)
//     K/V within the rounding bound of tests/test_serving.cpp; paged_attention
//     on the cache, and on a copy of its pool with the blocks in a decoded
//     order and junk past each table's used entries, equal it bit for bit;
//     1 and 2 threads give the same bits,
//   - varlen_attention on decoded cu_seqlens against one reference per sequence,
//   - merge_partials of two reference halves over a key split against the whole,
//   - topk_attention (causal) against reference::topk_attention;
// and about 1 operation in 8 passes a broken argument (a sequence id past the
// cache, more query rows than tokens, a page outside the pool, a length past
// the table, cu_seqlens not monotone or not ending at the packed length, merge
// shapes that differ), which must raise attn::Error before anything is
// written. Sanitizer reports are failures.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>
#include <attn/ops/cache.hpp>
#include <attn/ops/merge.hpp>
#include <attn/ops/topk.hpp>
#include <attn/ops/varlen.hpp>
#include <attn/reference/topk.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using attn::index_t;
using attn_fuzz::Bytes;
using attn_fuzz::max_abs;
using attn_fuzz::max_row_norm;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_serving: %s\n", what.c_str());
  std::abort();
}

template <class F>
std::string error_of(F&& call) {
  try {
    call();
  } catch (const attn::Error& e) {
    return e.what();
  }
  fail("a broken argument was accepted");
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

constexpr index_t kSlots = 4;  // sequences: the contiguous cache's batch, paged ids 0..3

/// Everything decoded before the operations.
struct Plan {
  index_t kv_heads = 1, q_heads = 1, d = 1, dv = 1;
  int mask = 0, mod = 0;
  index_t left = 0, right = 0;
  index_t capacity = 8, blocks = 4, block_size = 2;
  double amp = 1;
  attn::AttentionOptions opt;  // scale, tiles, threads
  std::mt19937 gen;
};

/// Float tolerance of tests/support.hpp: 8·eps·(√D + √Lk + smax)·max(vmax, 1).
double tolerance(index_t d, index_t lk, double smax, double vmax) {
  const double eps = std::numeric_limits<float>::epsilon();
  return 8.0 * eps *
         (std::sqrt(static_cast<double>(d)) + std::sqrt(static_cast<double>(lk)) + smax) *
         std::max(vmax, 1.0);
}

double scale_of(const Plan& p) {
  return p.opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.d)));
}

std::vector<float> random_vector(Plan& p, std::size_t n, double amp) {
  std::normal_distribution<double> dist(0.0, amp);
  std::vector<float> x(n);
  for (auto& e : x) e = static_cast<float>(dist(p.gen));
  return x;
}

/// Compares out [1, Hq, Lq, Dv] (and lse [Hq·Lq], row-major) with the fp64
/// reference over k, v [1, Hkv, Lk, D / Dv]; `bound(h, i)` is the allowed
/// error of each output row beyond the float tolerance.
template <class K, class V, class Mask, class Mod, class Bound>
void expect_reference(const attn::Tensor4<const float>& q, const attn::Tensor4<K>& k,
                      const attn::Tensor4<V>& v, const attn::Tensor4<const float>& out,
                      const float* lse, const Mask& mask, const Mod& mod, const Plan& p,
                      Bound&& bound, const std::string& what) {
  const index_t hq = q.extent(1), lq = q.extent(2), lk = k.extent(2);
  std::vector<double> ref_buf(static_cast<std::size_t>(hq * lq * p.dv));
  std::vector<float> ref_lse(static_cast<std::size_t>(hq * lq));
  const auto ref = attn::bhsd(ref_buf.data(), 1, hq, lq, p.dv);
  attn::AttentionOptions ro;
  ro.scale = p.opt.scale;
  ro.lse = attn::TensorView<float, 3>(ref_lse.data(), {1, hq, lq});
  attn::reference::attention(q, k, v, ref, mask, mod, ro);
  double smax = std::abs(scale_of(p)) * max_row_norm(q) * max_row_norm(k);
  if (p.mod == 1) smax += static_cast<double>(lq + lk);  // ALiBi slopes <= 1
  const double vmax = max_abs(v);
  const double tol = tolerance(p.d, lk, smax, vmax);
  const double score_tol = tolerance(p.d, lk, smax, 1.0);
  for (index_t h = 0; h < hq; ++h)
    for (index_t i = 0; i < lq; ++i) {
      const std::size_t row = static_cast<std::size_t>(h * lq + i);
      const bool empty = std::isinf(ref_lse[row]);
      const double allowed = tol + bound(h, i);
      for (index_t c = 0; c < p.dv; ++c) {
        const double x = out(0, h, i, c), y = ref(0, h, i, c);
        if (empty ? x != 0.0 : !(std::abs(x - y) <= allowed))
          fail(what + ": out (" + std::to_string(h) + ", " + std::to_string(i) + ", " +
               std::to_string(c) + ") is " + std::to_string(x) + ", reference " +
               std::to_string(y) + ", tolerance " + std::to_string(allowed));
      }
      if (!lse) continue;
      const double l = lse[row], lr = ref_lse[row];
      if (empty ? l != lr
                : !(std::abs(l - lr) <= (score_tol + bound(h, i) + 1e-6) * (1 + std::abs(lr))))
        fail(what + ": lse of row " + std::to_string(row) + " is " + std::to_string(l) +
             ", reference " + std::to_string(lr));
    }
}

// ------------------------------------------------------------ the caches --

/// What has been appended to one sequence, unrounded: token-major [len, Hkv, D].
struct Truth {
  std::vector<float> k, v;
  index_t len = 0;
};

template <class T>
struct Caches {
  attn::KVCache<T> flat;
  attn::PagedKVCache<T> paged;
  std::array<Truth, kSlots> truth;
  std::array<bool, kSlots> live{};

  explicit Caches(const Plan& p)
      : flat(kSlots, p.kv_heads, p.capacity, p.d, p.dv),
        paged(p.blocks, p.block_size, p.kv_heads, p.d, p.dv) {}
};

/// The K or V rows of a cache sequence as the cache holds them, in double
/// (int8: scale · x̂), [1, Hkv, len, dim].
template <class T>
std::vector<double> materialise(const attn::Tensor4<const T>& rows,
                                const attn::TensorView<const float, 3>& scales, index_t b) {
  const index_t heads = rows.extent(1), len = rows.extent(2), dim = rows.extent(3);
  std::vector<double> x(static_cast<std::size_t>(heads * len * dim));
  for (index_t h = 0; h < heads; ++h)
    for (index_t t = 0; t < len; ++t)
      for (index_t c = 0; c < dim; ++c) {
        double e = static_cast<double>(rows(0, h, t, c));
        if constexpr (std::is_same<T, std::int8_t>::value) e *= scales(b, h, t);
        x[static_cast<std::size_t>((h * len + t) * dim + c)] = e;
      }
  return x;
}

/// Relative (bf16, float) or row-relative (int8: max|row| / 254) error of a stored element.
template <class T>
double storage_rounding() {
  if constexpr (std::is_same<T, std::int8_t>::value)
    return 1.0 / 254.0;
  else
    return std::ldexp(1.0, -std::numeric_limits<T>::digits);
}

template <class T>
void append(Caches<T>& c, Plan& p, Bytes& in) {
  const index_t s = in.range(0, kSlots - 1), n = in.range(1, 6);
  if (!c.live[static_cast<std::size_t>(s)]) return;
  std::vector<float> k = random_vector(p, static_cast<std::size_t>(n * p.kv_heads * p.d), p.amp);
  std::vector<float> v = random_vector(p, static_cast<std::size_t>(n * p.kv_heads * p.dv), 1.0);
  const auto kv = attn::bshd<const float>(k.data(), 1, n, p.kv_heads, p.d);
  const auto vv = attn::bshd<const float>(v.data(), 1, n, p.kv_heads, p.dv);
  const bool flat_ok = c.flat.length(s) + n <= c.flat.capacity();
  const bool paged_ok = c.paged.blocks_needed(s, n) <= c.paged.free_blocks();
  if (flat_ok && paged_ok) {
    c.flat.append(s, kv, vv);
    c.paged.append(s, kv, vv);
    Truth& t = c.truth[static_cast<std::size_t>(s)];
    t.k.insert(t.k.end(), k.begin(), k.end());
    t.v.insert(t.v.end(), v.begin(), v.end());
    t.len += n;
    return;
  }
  if (!flat_ok) {  // past the capacity: refused, nothing changed
    const std::size_t nk = static_cast<std::size_t>(kSlots * p.kv_heads * p.capacity * p.d),
                      nv = static_cast<std::size_t>(kSlots * p.kv_heads * p.capacity * p.dv);
    const std::vector<T> kb(c.flat.keys().data(), c.flat.keys().data() + nk),
        vb(c.flat.values().data(), c.flat.values().data() + nv);
    const std::vector<index_t> lengths = c.flat.lengths();
    const std::string msg = error_of([&] { c.flat.append(s, kv, vv); });
    if (c.flat.lengths() != lengths ||
        std::memcmp(kb.data(), c.flat.keys().data(), nk * sizeof(T)) ||
        std::memcmp(vb.data(), c.flat.values().data(), nv * sizeof(T)))
      fail("KVCache changed before the error: " + msg);
    return;
  }
  // Too few free blocks: refused, no block taken, nothing changed.
  const index_t free_before = c.paged.free_blocks(), len = c.paged.length(s);
  const std::vector<index_t> table = c.paged.block_table(s);
  const std::string msg = error_of([&] { c.paged.append(s, kv, vv); });
  if (c.paged.free_blocks() != free_before || c.paged.length(s) != len ||
      c.paged.block_table(s) != table)
    fail("PagedKVCache changed before the error: " + msg);
}

/// Forks, frees or adds a sequence in both caches (the contiguous one copies
/// the tokens, the paged one shares the blocks).
template <class T>
void reshape(Caches<T>& c, Bytes& in) {
  const int op = static_cast<int>(in.range(0, 2));
  const index_t s = in.range(0, kSlots - 1);
  const auto su = static_cast<std::size_t>(s);
  if (op == 0 && c.live[su]) {  // free
    c.paged.free(s);
    c.flat.truncate(s, 0);
    c.truth[su] = Truth{};
    c.live[su] = false;
    return;
  }
  const auto dead = std::find(c.live.begin(), c.live.end(), false);
  if (dead == c.live.end()) return;
  const index_t id = op == 1 && c.live[su] ? c.paged.fork(s) : c.paged.add_sequence();
  if (id < 0 || id >= kSlots || c.live[static_cast<std::size_t>(id)])
    fail("PagedKVCache gave sequence id " + std::to_string(id) + " with a free id below " +
         std::to_string(kSlots));
  const auto iu = static_cast<std::size_t>(id);
  c.live[iu] = true;
  c.flat.truncate(id, 0);
  c.truth[iu] = Truth{};
  if (op == 1 && c.live[su] && s != id && c.truth[su].len > 0) {
    const Truth& t = c.truth[su];
    c.flat.append(
        id, attn::bshd<const float>(t.k.data(), 1, t.len, c.flat.kv_heads(), c.flat.head_dim()),
        attn::bshd<const float>(t.v.data(), 1, t.len, c.flat.kv_heads(), c.flat.head_dim_v()));
    c.truth[iu] = t;
  }
  if (c.paged.length(id) != c.flat.length(id)) fail("fork: paged and contiguous lengths differ");
}

/// Attention of 1-4 new query rows per listed sequence, through every cache path.
template <class T, class Mask, class Mod>
void attend(Caches<T>& c, Plan& p, Bytes& in, const Mask& mask, const Mod& mod) {
  const index_t lq = in.range(1, 4), n = in.range(1, 3);
  const int corrupt = in.range(0, 7) == 7 ? static_cast<int>(in.range(1, 4)) : 0;
  std::vector<index_t> ids;
  for (index_t i = 0; i < n; ++i) {
    const index_t s = in.range(0, kSlots - 1);
    if (c.live[static_cast<std::size_t>(s)] && c.flat.length(s) >= lq) ids.push_back(s);
  }
  if (ids.empty()) return;
  const auto ni = static_cast<index_t>(ids.size());
  std::vector<float> qb =
      random_vector(p, static_cast<std::size_t>(ni * p.q_heads * lq * p.d), p.amp);
  const auto q = attn::bhsd<const float>(qb.data(), ni, p.q_heads, lq, p.d);
  std::vector<float> ob =
      random_vector(p, static_cast<std::size_t>(ni * p.q_heads * lq * p.dv), 1.0);
  std::vector<float> lse(static_cast<std::size_t>(ni * p.q_heads * lq), 7.f);
  const auto out = attn::bhsd(ob.data(), ni, p.q_heads, lq, p.dv);
  attn::AttentionOptions opt = p.opt;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {ni, p.q_heads, lq});

  // The paged pool with its blocks in a decoded order, and the tables of `ids`
  // through it; entries past a sequence's last block hold junk.
  const index_t nb = c.paged.num_blocks(), bs = c.paged.block_size();
  std::vector<index_t> perm(static_cast<std::size_t>(nb));
  std::iota(perm.begin(), perm.end(), index_t{0});
  std::shuffle(perm.begin(), perm.end(), p.gen);
  index_t width = 1;
  for (index_t s : ids)
    width = std::max(width, static_cast<index_t>(c.paged.block_table(s).size()));
  std::vector<std::int32_t> tables(static_cast<std::size_t>(ni * width), -7);
  std::vector<index_t> lengths;
  for (index_t i = 0; i < ni; ++i) {
    const auto& t = c.paged.block_table(ids[static_cast<std::size_t>(i)]);
    for (std::size_t j = 0; j < t.size(); ++j)
      tables[static_cast<std::size_t>(i * width) + j] =
          static_cast<std::int32_t>(perm[static_cast<std::size_t>(t[j])]);
    lengths.push_back(c.paged.length(ids[static_cast<std::size_t>(i)]));
  }
  const auto pk = c.paged.pool_keys(), pv = c.paged.pool_values();
  const index_t kb = p.kv_heads * bs * p.d, vbk = p.kv_heads * bs * p.dv;  // elements per block
  std::vector<T> k_pool(pk.data(), pk.data() + nb * kb), v_pool(pv.data(), pv.data() + nb * vbk);
  for (index_t b = 0; b < nb; ++b) {
    std::copy_n(pk.data() + b * kb, kb, k_pool.begin() + perm[static_cast<std::size_t>(b)] * kb);
    std::copy_n(pv.data() + b * vbk, vbk, v_pool.begin() + perm[static_cast<std::size_t>(b)] * vbk);
  }
  const auto kp = attn::bhsd<const T>(k_pool.data(), nb, p.kv_heads, bs, p.d);
  const auto vp = attn::bhsd<const T>(v_pool.data(), nb, p.kv_heads, bs, p.dv);
  auto raw_paged = [&](const std::vector<std::int32_t>& tb, const std::vector<index_t>& len,
                       const attn::Tensor4<float>& o, const attn::AttentionOptions& oo) {
    if constexpr (!std::is_same<T, std::int8_t>::value)
      attn::paged_attention(q, kp, vp,
                            attn::TensorView<const std::int32_t, 2>(tb.data(), {ni, width}), len, o,
                            mask, mod, oo);
  };
  constexpr bool raw = !std::is_same<T, std::int8_t>::value;

  if (corrupt) {
    const std::vector<float> ob0 = ob;
    std::string msg;
    if (corrupt == 1) {  // a sequence id past the cache
      std::vector<index_t> bad = ids;
      bad.back() = kSlots + static_cast<index_t>(in.range(0, 2));
      msg = error_of([&] { attn::cache_attention(q, c.flat, bad, out, mask, mod, opt); });
      error_of([&] { attn::paged_attention(q, c.paged, bad, out, mask, mod, opt); });
    } else if (corrupt == 2) {  // one more query row than the shortest sequence holds
      index_t shortest = c.flat.length(ids[0]);
      for (index_t s : ids) shortest = std::min(shortest, c.flat.length(s));
      std::vector<float> qb2(static_cast<std::size_t>(ni * p.q_heads * (shortest + 1) * p.d));
      std::vector<float> ob2(static_cast<std::size_t>(ni * p.q_heads * (shortest + 1) * p.dv), 3.f);
      const auto q2 = attn::bhsd<const float>(qb2.data(), ni, p.q_heads, shortest + 1, p.d);
      const auto o2 = attn::bhsd(ob2.data(), ni, p.q_heads, shortest + 1, p.dv);
      msg = error_of([&] { attn::cache_attention(q2, c.flat, ids, o2, mask, mod, p.opt); });
      error_of([&] { attn::paged_attention(q2, c.paged, ids, o2, mask, mod, p.opt); });
      if (std::any_of(ob2.begin(), ob2.end(), [](float x) { return x != 3.f; }))
        fail("out written before the error: " + msg);
    } else if (corrupt == 3 && raw) {  // a used table entry outside the pool
      std::vector<std::int32_t> bad = tables;
      const index_t i = in.range(0, ni - 1);
      bad[static_cast<std::size_t>(i * width)] = in.flag() ? -1 : static_cast<std::int32_t>(nb);
      msg = error_of([&] { raw_paged(bad, lengths, out, opt); });
    } else if (raw) {  // a length past the table's blocks
      std::vector<index_t> bad = lengths;
      bad[static_cast<std::size_t>(in.range(0, ni - 1))] = width * bs + 1;
      msg = error_of([&] { raw_paged(tables, bad, out, opt); });
    }
    if (!same_bytes(ob, ob0) ||
        std::any_of(lse.begin(), lse.end(), [](float x) { return x != 7.f; }))
      fail("out or lse written before the error: " + msg);
    return;
  }

  attn::cache_attention(q, c.flat, ids, out, mask, mod, opt);

  // Against the reference on what the cache holds, and on what was appended.
  const double r = storage_rounding<T>();
  for (index_t i = 0; i < ni; ++i) {
    const index_t s = ids[static_cast<std::size_t>(i)], len = c.flat.length(s);
    const std::vector<double> km = materialise(c.flat.keys(s), c.flat.key_scales(), s);
    const std::vector<double> vm = materialise(c.flat.values(s), c.flat.value_scales(), s);
    const auto qi =
        attn::bhsd<const float>(qb.data() + i * p.q_heads * lq * p.d, 1, p.q_heads, lq, p.d);
    const auto oi =
        attn::bhsd<const float>(ob.data() + i * p.q_heads * lq * p.dv, 1, p.q_heads, lq, p.dv);
    const float* li = lse.data() + i * p.q_heads * lq;
    const std::string what = "cache_attention of sequence " + std::to_string(s) + " (" +
                             std::to_string(len) + " tokens)";
    // int8 decoding runs in integers (kernels/body.inl, tests/test_serving.cpp):
    // a query rounded to int16 steps of max|q|/32767 moves a score by at most
    // δ = |scale|·D·max|q|·max|k̂|/65534, and a tile's weights rounded to steps of
    // 1/32767 of their row's largest move out by at most Bc·max|v̂|/65534.
    auto abs_max = [](const std::vector<double>& x) {
      double m = 0;
      for (double e : x) m = std::max(m, std::abs(e));
      return m;
    };
    const double km_max = abs_max(km), vm_max = abs_max(vm);
    const double bc = p.opt.block_k > 0 ? static_cast<double>(p.opt.block_k) : 256.0;
    expect_reference(
        qi, attn::bhsd<const double>(km.data(), 1, p.kv_heads, len, p.d),
        attn::bhsd<const double>(vm.data(), 1, p.kv_heads, len, p.dv), oi, li, mask, mod, p,
        [&](index_t h, index_t row) -> double {
          if constexpr (!std::is_same<T, std::int8_t>::value) return 0.0;
          double qm = 0;
          for (index_t c2 = 0; c2 < p.d; ++c2)
            qm = std::max(qm, std::abs(static_cast<double>(qi(0, h, row, c2))));
          const double delta = std::abs(scale_of(p)) * p.d * qm * km_max / 65534.0;
          return std::expm1(2 * delta) * vm_max + bc * vm_max / 65534.0;
        },
        what);
    // tests/test_serving.cpp's bound: each stored element is off by r·max|x| of
    // its row (int8) or r·|x| (rounding), so a score moves by at most
    // Δ = scale·‖q‖₁·kmax·r and out by (e^{2Δ} − 1)·vmax + vmax·r.
    const Truth& t = c.truth[static_cast<std::size_t>(s)];
    const auto kt = attn::bshd<const float>(t.k.data(), 1, len, p.kv_heads, p.d);
    const auto vt = attn::bshd<const float>(t.v.data(), 1, len, p.kv_heads, p.dv);
    const double kmax = max_abs(kt), vmax = max_abs(vt), sc = std::abs(scale_of(p));
    expect_reference(
        qi, kt, vt, oi, nullptr, mask, mod, p,
        [&](index_t h, index_t row) {
          double q1 = 0;
          for (index_t c2 = 0; c2 < p.d; ++c2)
            q1 += std::abs(static_cast<double>(qi(0, h, row, c2)));
          const double delta = sc * q1 * kmax * r;
          return std::expm1(2 * delta) * vmax + vmax * r;
        },
        what + " against the appended K/V");
  }

  // The paged cache, read in place and through a reordered copy of its pool,
  // and another thread count: the same bits.
  auto expect_same = [&](auto&& call, const char* what) {
    std::vector<float> o2(ob.size(), -5.f), l2(lse.size(), -5.f);
    attn::AttentionOptions oo = opt;
    oo.lse = attn::TensorView<float, 3>(l2.data(), {ni, p.q_heads, lq});
    call(attn::bhsd(o2.data(), ni, p.q_heads, lq, p.dv), oo);
    if (!same_bytes(o2, ob) || !same_bytes(l2, lse))
      fail(std::string(what) + " differs from cache_attention");
  };
  expect_same([&](const auto& o,
                  const auto& oo) { attn::paged_attention(q, c.paged, ids, o, mask, mod, oo); },
              "paged_attention on the PagedKVCache");
  if constexpr (raw)
    expect_same([&](const auto& o, const auto& oo) { raw_paged(tables, lengths, o, oo); },
                "paged_attention on a reordered pool");
  expect_same(
      [&](const auto& o, auto oo) {
        oo.num_threads = opt.num_threads == 1 ? 2 : 1;
        attn::cache_attention(q, c.flat, ids, o, mask, mod, oo);
      },
      "cache_attention with another thread count");
}

// ---------------------------------------------------------------- varlen --

template <class Mask, class Mod>
void varlen(Plan& p, Bytes& in, const Mask& mask, const Mod& mod) {
  const index_t n = in.range(1, 3);
  std::vector<index_t> cq{0}, ck{0};
  for (index_t s = 0; s < n; ++s) {
    cq.push_back(cq.back() + in.range(0, 6));
    ck.push_back(ck.back() + in.range(0, 10));
  }
  if (cq.back() == 0) ++cq.back();
  if (ck.back() == 0) ++ck.back();
  const index_t tq = cq.back(), tk = ck.back();
  std::vector<float> qb = random_vector(p, static_cast<std::size_t>(tq * p.q_heads * p.d), p.amp);
  std::vector<float> kb = random_vector(p, static_cast<std::size_t>(tk * p.kv_heads * p.d), p.amp);
  std::vector<float> vb = random_vector(p, static_cast<std::size_t>(tk * p.kv_heads * p.dv), 1.0);
  std::vector<float> ob = random_vector(p, static_cast<std::size_t>(tq * p.q_heads * p.dv), 1.0);
  std::vector<float> lse(static_cast<std::size_t>(p.q_heads * tq), 7.f);
  // FlashAttention's packed [total, H, D] buffers.
  const auto q = attn::bshd<const float>(qb.data(), 1, tq, p.q_heads, p.d);
  const auto k = attn::bshd<const float>(kb.data(), 1, tk, p.kv_heads, p.d);
  const auto v = attn::bshd<const float>(vb.data(), 1, tk, p.kv_heads, p.dv);
  const auto out = attn::bshd(ob.data(), 1, tq, p.q_heads, p.dv);
  attn::AttentionOptions opt = p.opt;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {1, p.q_heads, tq});

  if (in.range(0, 7) == 7) {  // broken cu_seqlens: refused before any write
    std::vector<index_t> bq = cq, bk = ck;
    switch (in.range(0, 2)) {
      case 0:  // not monotone
        bq.insert(bq.begin() + 1, tq + 1);
        bk.insert(bk.begin() + 1, 0);
        break;
      case 1:  // not ending at the packed length
        bk.back() = tk + 1;
        break;
      default:  // not starting at 0
        bq.front() = 1;
        break;
    }
    const std::vector<float> ob0 = ob;
    const std::string msg =
        error_of([&] { attn::varlen_attention(q, k, v, out, bq, bk, mask, mod, opt); });
    if (!same_bytes(ob, ob0) ||
        std::any_of(lse.begin(), lse.end(), [](float x) { return x != 7.f; }))
      fail("varlen wrote before the error: " + msg);
    return;
  }

  attn::varlen_attention(q, k, v, out, cq, ck, mask, mod, opt);
  for (index_t s = 0; s < n; ++s) {
    const index_t q0 = cq[static_cast<std::size_t>(s)],
                  lq = cq[static_cast<std::size_t>(s) + 1] - q0;
    const index_t k0 = ck[static_cast<std::size_t>(s)],
                  lk = ck[static_cast<std::size_t>(s) + 1] - k0;
    if (lq == 0) continue;
    // This sequence's rows as [1, Hq, lq, Dv] (lse copied to [Hq, lq]).
    std::vector<float> ls(static_cast<std::size_t>(p.q_heads * lq));
    for (index_t h = 0; h < p.q_heads; ++h)
      for (index_t i = 0; i < lq; ++i)
        ls[static_cast<std::size_t>(h * lq + i)] = lse[static_cast<std::size_t>(h * tq + q0 + i)];
    const auto os =
        attn::bshd<const float>(ob.data() + q0 * p.q_heads * p.dv, 1, lq, p.q_heads, p.dv);
    const std::string what = "varlen sequence " + std::to_string(s);
    if (lk == 0) {  // sees no key: zeros, lse -inf
      for (index_t h = 0; h < p.q_heads; ++h)
        for (index_t i = 0; i < lq; ++i) {
          if (ls[static_cast<std::size_t>(h * lq + i)] != -std::numeric_limits<float>::infinity())
            fail(what + ": a row without keys has lse " +
                 std::to_string(ls[static_cast<std::size_t>(h * lq + i)]));
          for (index_t c = 0; c < p.dv; ++c)
            if (os(0, h, i, c) != 0.f) fail(what + ": a row without keys is not zero");
        }
      continue;
    }
    expect_reference(
        attn::bshd<const float>(qb.data() + q0 * p.q_heads * p.d, 1, lq, p.q_heads, p.d),
        attn::bshd<const float>(kb.data() + k0 * p.kv_heads * p.d, 1, lk, p.kv_heads, p.d),
        attn::bshd<const float>(vb.data() + k0 * p.kv_heads * p.dv, 1, lk, p.kv_heads, p.dv), os,
        ls.data(), mask, mod, p, [](index_t, index_t) { return 0.0; }, what);
  }
  std::vector<float> o2(ob.size(), -5.f), l2(lse.size(), -5.f);
  attn::AttentionOptions other = opt;
  other.num_threads = opt.num_threads == 1 ? 2 : 1;
  other.lse = attn::TensorView<float, 3>(l2.data(), {1, p.q_heads, tq});
  attn::varlen_attention(q, k, v, attn::bshd(o2.data(), 1, tq, p.q_heads, p.dv), cq, ck, mask, mod,
                         other);
  if (!same_bytes(o2, ob) || !same_bytes(l2, lse)) fail("varlen differs between 1 and 2 threads");
}

// ----------------------------------------------------------------- merge --

/// Two reference halves over keys [0, m) and [m, Lk), merged, against the whole.
void merge(Plan& p, Bytes& in) {
  const index_t B = in.range(1, 2), H = p.q_heads, L = in.range(1, 6), lk = in.range(1, 12);
  const index_t m = in.range(0, lk);
  std::vector<float> qb = random_vector(p, static_cast<std::size_t>(B * H * L * p.d), p.amp);
  std::vector<float> kb = random_vector(p, static_cast<std::size_t>(B * H * lk * p.d), p.amp);
  std::vector<float> vb = random_vector(p, static_cast<std::size_t>(B * H * lk * p.dv), 1.0);
  const auto q = attn::bhsd<const float>(qb.data(), B, H, L, p.d);
  const auto k = attn::bhsd<const float>(kb.data(), B, H, lk, p.d);
  const auto v = attn::bhsd<const float>(vb.data(), B, H, lk, p.dv);
  const std::size_t rows = static_cast<std::size_t>(B * H * L);
  // Part over keys [k0, k1): zeros and lse -inf when empty (a row that saw no key).
  auto part = [&](index_t k0, index_t k1, std::vector<float>& o, std::vector<float>& l) {
    o.assign(rows * static_cast<std::size_t>(p.dv), 0.f);
    l.assign(rows, -std::numeric_limits<float>::infinity());
    if (k1 == k0) return;
    attn::AttentionOptions ro;
    ro.scale = p.opt.scale;
    ro.lse = attn::TensorView<float, 3>(l.data(), {B, H, L});
    attn::reference::attention(
        q, attn::Tensor4<const float>(&k(0, 0, k0, 0), {B, H, k1 - k0, p.d}, k.strides()),
        attn::Tensor4<const float>(&v(0, 0, k0, 0), {B, H, k1 - k0, p.dv}, v.strides()),
        attn::bhsd(o.data(), B, H, L, p.dv), attn::no_mask(), attn::no_score_mod(), ro);
  };
  std::vector<float> oa, la, ob, lb;
  part(0, m, oa, la);
  part(m, lk, ob, lb);
  const auto out = attn::bhsd(oa.data(), B, H, L, p.dv);
  const attn::TensorView<float, 3> lse(la.data(), {B, H, L});
  const auto out_b = attn::bhsd<const float>(ob.data(), B, H, L, p.dv);
  const attn::TensorView<const float, 3> lse_b(lb.data(), {B, H, L});
  const int threads = p.opt.num_threads;

  if (in.range(0, 7) == 7) {  // shapes that differ, or lse on top of out: refused before any write
    const std::vector<float> oa0 = oa, la0 = la;
    std::string msg;
    if (in.flag())
      msg = error_of([&] {
        attn::merge_partials(out, lse, attn::bhsd<const float>(ob.data(), B, H, L, p.dv + 1), lse_b,
                             threads);
      });
    else
      msg = error_of([&] {
        attn::merge_partials(out, attn::TensorView<float, 3>(oa.data(), {B, H, L}), out_b, lse_b,
                             threads);
      });
    if (!same_bytes(oa, oa0) || !same_bytes(la, la0))
      fail("merge_partials wrote before the error: " + msg);
    return;
  }

  std::vector<float> oc = oa, lc = la;
  attn::merge_partials(out, lse, out_b, lse_b, threads);
  attn::merge_partials(attn::bhsd(oc.data(), B, H, L, p.dv),
                       attn::TensorView<float, 3>(lc.data(), {B, H, L}), out_b, lse_b,
                       threads == 1 ? 2 : 1);
  if (!same_bytes(oa, oc) || !same_bytes(la, lc))
    fail("merge_partials differs between thread counts");
  for (index_t b = 0; b < B; ++b)
    expect_reference(
        attn::Tensor4<const float>(&q(b, 0, 0, 0), {1, H, L, p.d}, q.strides()),
        attn::Tensor4<const float>(&k(b, 0, 0, 0), {1, H, lk, p.d}, k.strides()),
        attn::Tensor4<const float>(&v(b, 0, 0, 0), {1, H, lk, p.dv}, v.strides()),
        attn::bhsd<const float>(oa.data() + b * H * L * p.dv, 1, H, L, p.dv), la.data() + b * H * L,
        attn::no_mask(), attn::no_score_mod(), p,
        // each half is rounded to float once more before the merge
        [&](index_t, index_t) { return 2.0 * std::numeric_limits<float>::epsilon() * max_abs(v); },
        "merge_partials at key " + std::to_string(m) + " of " + std::to_string(lk));
}

// ------------------------------------------------------------------ top-k --

/// topk_attention under causal against reference::topk_attention: out, lse
/// and the selected keys (as a set: the order of scores within float's
/// error of each other may differ). A row whose k-th and (k+1)-th scores lie
/// within twice the score error of each other has no unique selection and
/// is skipped.
void topk(Plan& p, Bytes& in) {
  const index_t B = in.range(1, 2), lq = in.range(1, 6), lk = in.range(1, 16);
  const index_t k_best = in.range(1, lk + 2), hq = p.q_heads, hkv = p.kv_heads;
  std::vector<float> qb = random_vector(p, static_cast<std::size_t>(B * hq * lq * p.d), p.amp);
  std::vector<float> kb = random_vector(p, static_cast<std::size_t>(B * hkv * lk * p.d), p.amp);
  std::vector<float> vb = random_vector(p, static_cast<std::size_t>(B * hkv * lk * p.dv), 1.0);
  const auto q = attn::bhsd<const float>(qb.data(), B, hq, lq, p.d);
  const auto k = attn::bhsd<const float>(kb.data(), B, hkv, lk, p.d);
  const auto v = attn::bhsd<const float>(vb.data(), B, hkv, lk, p.dv);
  const std::size_t rows = static_cast<std::size_t>(B * hq * lq);
  std::vector<float> ob(rows * static_cast<std::size_t>(p.dv), 3.f), lse(rows, 7.f);
  std::vector<std::int64_t> idx(rows * static_cast<std::size_t>(k_best), 99);
  const auto out = attn::bhsd(ob.data(), B, hq, lq, p.dv);
  attn::TopkOptions o(p.opt);
  o.lse = attn::TensorView<float, 3>(lse.data(), {B, hq, lq});
  o.indices = attn::bhsd(idx.data(), B, hq, lq, k_best);

  if (in.range(0, 7) == 7) {  // k_best < 1, or indices of the wrong width: refused before any write
    const std::vector<std::int64_t> idx0 = idx;
    const index_t bad = in.flag() ? 1 - in.range(1, 3) : k_best - 1;  // < 1, or not indices' width
    const std::string msg = error_of(
        [&] { attn::topk_attention(q, k, v, out, bad, attn::causal(), attn::no_score_mod(), o); });
    if (std::any_of(ob.begin(), ob.end(), [](float x) { return x != 3.f; }) ||
        std::any_of(lse.begin(), lse.end(), [](float x) { return x != 7.f; }) ||
        !same_bytes(idx, idx0))
      fail("topk_attention wrote before the error: " + msg);
    return;
  }

  attn::topk_attention(q, k, v, out, k_best, attn::causal(), attn::no_score_mod(), o);
  std::vector<double> rb(ob.size());
  std::vector<float> rl(rows);
  std::vector<std::int64_t> ri(idx.size());
  attn::AttentionOptions ro;
  ro.scale = p.opt.scale;
  ro.lse = attn::TensorView<float, 3>(rl.data(), {B, hq, lq});
  attn::reference::topk_attention(q, k, v, attn::bhsd(rb.data(), B, hq, lq, p.dv), k_best,
                                  attn::causal(), attn::no_score_mod(), ro,
                                  attn::bhsd(ri.data(), B, hq, lq, k_best));

  const double scale = scale_of(p), smax = std::abs(scale) * max_row_norm(q) * max_row_norm(k);
  const double score_tol = tolerance(p.d, lk, smax, 1.0),
               tol = tolerance(p.d, lk, smax, max_abs(v));
  const index_t group = hq / hkv;
  std::vector<double> sc;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < hq; ++h)
      for (index_t i = 0; i < lq; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * hq + h) * lq + i);
        sc.clear();  // the selectable scores: keys j <= i + lk - lq (bottom-right causal)
        for (index_t j = 0; j <= std::min(lk - 1, i + lk - lq); ++j) {
          double dot = 0;
          for (index_t c = 0; c < p.d; ++c)
            dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(k(b, h / group, j, c));
          sc.push_back(scale * dot);
        }
        std::sort(sc.begin(), sc.end(), std::greater<double>());
        const auto n = std::min<std::size_t>(static_cast<std::size_t>(k_best), sc.size());
        if (n < sc.size() && sc[n - 1] - sc[n] <= 2 * score_tol) continue;  // no unique selection
        const std::string where = "topk row " + std::to_string(row) + " (k_best " +
                                  std::to_string(k_best) + ", " + std::to_string(sc.size()) +
                                  " selectable)";
        std::vector<std::int64_t> a(idx.begin() + static_cast<std::ptrdiff_t>(row) * k_best,
                                    idx.begin() + static_cast<std::ptrdiff_t>(row + 1) * k_best),
            r(ri.begin() + static_cast<std::ptrdiff_t>(row) * k_best,
              ri.begin() + static_cast<std::ptrdiff_t>(row + 1) * k_best);
        std::sort(a.begin(), a.end());
        std::sort(r.begin(), r.end());
        if (a != r) fail(where + ": selected keys differ from the reference");
        for (index_t c = 0; c < p.dv; ++c) {
          const double x = ob[row * static_cast<std::size_t>(p.dv) + static_cast<std::size_t>(c)],
                       y = rb[row * static_cast<std::size_t>(p.dv) + static_cast<std::size_t>(c)];
          if (sc.empty() ? x != 0.0 : !(std::abs(x - y) <= tol))
            fail(where + ": out " + std::to_string(x) + ", reference " + std::to_string(y) +
                 ", tolerance " + std::to_string(tol));
        }
        if (sc.empty() ? lse[row] != rl[row]
                       : !(std::abs(static_cast<double>(lse[row]) - rl[row]) <=
                           (score_tol + 1e-6) * (1 + std::abs(static_cast<double>(rl[row])))))
          fail(where + ": lse " + std::to_string(lse[row]) + ", reference " +
               std::to_string(rl[row]));
      }

  std::vector<float> o2(ob.size(), -5.f), l2(lse.size(), -5.f);
  std::vector<std::int64_t> i2(idx.size(), -5);
  attn::TopkOptions other = o;
  other.num_threads = p.opt.num_threads == 1 ? 2 : 1;
  other.lse = attn::TensorView<float, 3>(l2.data(), {B, hq, lq});
  other.indices = attn::bhsd(i2.data(), B, hq, lq, k_best);
  attn::topk_attention(q, k, v, attn::bhsd(o2.data(), B, hq, lq, p.dv), k_best, attn::causal(),
                       attn::no_score_mod(), other);
  if (!same_bytes(o2, ob) || !same_bytes(l2, lse) || !same_bytes(i2, idx))
    fail("topk differs between 1 and 2 threads");
}

// ------------------------------------------------------------- dispatch --

template <class T, class Mask, class Mod>
void run_ops(Plan& p, Bytes& in, const Mask& mask, const Mod& mod) {
  Caches<T> c(p);
  const index_t first = in.range(1, kSlots);
  for (index_t s = 0; s < first; ++s) {
    if (c.paged.add_sequence() != s) fail("PagedKVCache's first ids are not 0, 1, ...");
    c.live[static_cast<std::size_t>(s)] = true;
  }
  const index_t ops = in.range(1, 12);
  for (index_t i = 0; i < ops; ++i) switch (in.range(0, 8)) {
      case 0:
      case 1:
      case 2:
        append(c, p, in);
        break;
      case 3:
        reshape(c, in);
        break;
      case 4:
        varlen(p, in, mask, mod);
        break;
      case 5:
        merge(p, in);
        break;
      case 6:
        topk(p, in);
        break;
      default:
        attend(c, p, in, mask, mod);
        break;
    }
}

// Every (cache type, mask, modifier) instantiates the segment forward once for
// the caches and, per (mask, modifier), once for varlen (about 5 s of clang
// each under the sanitizers). Float caches take every mask without a
// modifier and ALiBi under causal (4); bfloat16 and int8 no mask and causal
// without a modifier (2 each); varlen follows the float set (4); top-k runs
// under causal only (1): 13 in all.
template <class T>
void run(Plan& p, Bytes& in) {
  constexpr bool all = std::is_same<T, float>::value;
  if (!all) {
    p.mask = p.mask % 2;
    p.mod = 0;
  }
  if constexpr (all)
    if (p.mod == 1) {
      p.mask = 1;
      return run_ops<T>(p, in, attn::causal(), attn::alibi(attn::alibi_slopes(p.q_heads)));
    }
  p.mod = 0;
  switch (p.mask) {
    case 0:
      return run_ops<T>(p, in, attn::no_mask(), attn::no_score_mod());
    case 1:
      return run_ops<T>(p, in, attn::causal(), attn::no_score_mod());
    default:
      if constexpr (all)
        return run_ops<T>(p, in, attn::window(p.left, p.right), attn::no_score_mod());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  Plan p;
  const int type = static_cast<int>(in.range(0, 2));
  p.kv_heads = in.range(1, 2);
  p.q_heads = p.kv_heads * in.range(1, 3);
  p.d = in.range(1, 16);
  p.dv = in.range(1, 16);
  p.mask = static_cast<int>(in.range(0, 2));
  p.mod = static_cast<int>(in.range(0, 1));
  p.left = in.range(-1, 10);
  p.right = in.range(-1, 3);
  p.capacity = in.range(1, 32);
  p.blocks = in.range(1, 16);
  p.block_size = in.range(1, 8);
  const double amps[] = {0.1, 1.0, 3.0, 10.0};
  p.amp = amps[in.range(0, 3)];
  if (in.flag()) p.opt.scale = static_cast<double>(in.range(-40, 40)) / 16.0;
  p.opt.block_q = in.range(0, 8);
  p.opt.block_k = in.range(0, 16);
  p.opt.num_threads = static_cast<int>(in.range(0, 2));
  p.gen.seed(in.byte() | static_cast<std::uint32_t>(in.byte()) << 8);
  switch (type) {
    case 0:
      run<float>(p, in);
      break;
    case 1:
      run<Eigen::bfloat16>(p, in);
      break;
    default:
      run<std::int8_t>(p, in);
      break;
  }
  return 0;
}
