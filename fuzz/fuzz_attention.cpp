// fuzz/fuzz_attention.cpp — libFuzzer target: the flash path against the
// fp64 reference on shapes, strides, masks, score modifiers, storage types
// and options decoded from the fuzz input.
//
// Build and run: scripts/ci-fuzz.sh (clang++ -fsanitize=fuzzer,address,undefined).
// Each input decodes one problem. The target aborts (a libFuzzer crash) when
//   - the flash output differs from the reference beyond the derived tolerance,
//   - a row that sees no key is not exactly zero with lse = -inf,
//   - one and two worker threads give different bits,
//   - a byte outside the output view (strides leave gaps) is written,
//   - a deliberately broken argument is not rejected by both paths with the
//     same attn::Error, or anything is written before the rejection;
// and sanitizers report any memory error or undefined behaviour.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;

// ---------------------------------------------------------------- decoding --

using attn_fuzz::Bytes;
using attn_fuzz::max_row_norm;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_attention: %s\n", what.c_str());
  std::abort();
}

template <class T>
double storage_eps() {
  return std::ldexp(1.0, 1 - std::numeric_limits<T>::digits);
}

/// A logical [B, H, L, D] tensor in its own buffer, with a decoded layout:
/// head-major or sequence-major, padded rows, and an element stride of 1 or 2
/// (so some views are not contiguous and the gaps can be checked for writes).
template <class T>
struct Buffer {
  std::vector<T> data;
  attn::Tensor4<T> view;

  Buffer(index_t B, index_t H, index_t L, index_t D, Bytes& in) {
    const bool seq_major = in.flag();
    const index_t es = in.range(1, 2), pad = in.range(0, 3);
    const index_t row = D * es + pad;
    data.assign(static_cast<std::size_t>(B * H * L * row), T(0));
    const std::array<index_t, 4> shape{B, H, L, D};
    view = seq_major ? attn::Tensor4<T>(data.data(), shape, {L * H * row, row, H * row, es})
                     : attn::Tensor4<T>(data.data(), shape, {H * L * row, L * row, row, es});
  }
  void fill(std::mt19937& gen, double amp) {
    std::normal_distribution<double> dist(0.0, amp);
    for (auto& x : data) x = static_cast<T>(dist(gen));
  }
  double max_abs() const {
    double m = 0;
    for (index_t b = 0; b < view.extent(0); ++b)
      for (index_t h = 0; h < view.extent(1); ++h)
        for (index_t l = 0; l < view.extent(2); ++l)
          for (index_t d = 0; d < view.extent(3); ++d)
            m = std::max(m, std::abs(static_cast<double>(view(b, h, l, d))));
    return m;
  }
  attn::Tensor4<const T> cview() const { return view; }
};

/// Everything decoded besides the storage types.
struct Plan {
  attn::AttentionShape s;
  int mask = 0, mod = 0, corrupt = 0;
  double amp = 1;
  std::uint32_t seed = 0;
  attn::AttentionOptions opt;
  bool with_lse = false;
  std::vector<index_t> lengths;  // key padding
  std::unique_ptr<bool[]> keep;  // bool mask [Bm, Hm, Lq, Lk]
  index_t mask_b = 1, mask_h = 1;
  std::vector<float> bias;  // additive bias [1 or B, Hq, Lq, Lk]
  index_t bias_b = 1;
  double cap = 1;
};

// -------------------------------------------------------------- one check --

/// Runs `call` expecting attn::Error; returns its message.
template <class F>
std::string error_of(F&& call) {
  try {
    call();
  } catch (const attn::Error& e) {
    return e.what();
  }
  fail("a broken argument was accepted");
}

template <class Q, class K, class V, class O, class Mask, class Mod>
void check(const Buffer<Q>& q, const Buffer<K>& k, const Buffer<V>& v, Buffer<O>& out,
           const Mask& mask, const Mod& mod, Plan& plan) {
  const attn::AttentionShape& s = plan.s;
  std::vector<float> lse(static_cast<std::size_t>(s.batch * s.q_heads * s.lq), 7.f);
  std::vector<float> lse_ref = lse;
  attn::AttentionOptions opt = plan.opt;
  attn::AttentionOptions ref_opt = plan.opt;
  if (plan.with_lse) {
    opt.lse = attn::TensorView<float, 3>(lse.data(), {s.batch, s.q_heads, s.lq});
    ref_opt.lse = attn::TensorView<float, 3>(lse_ref.data(), {s.batch, s.q_heads, s.lq});
  }
  std::vector<double> ref_buf(static_cast<std::size_t>(s.batch * s.q_heads * s.lq * s.dv));
  const auto ref = attn::bhsd(ref_buf.data(), s.batch, s.q_heads, s.lq, s.dv);
  const std::vector<O> before = out.data;

  // Broken arguments: both paths reject them with the same message, untouched output.
  if (plan.corrupt) {
    auto run_both = [&](const auto& qv, const auto& kv, const auto& vv, const auto& ov) {
      const std::string a =
          error_of([&] { attn::masked_attention(qv, kv, vv, ov, mask, mod, opt); });
      const std::string b =
          error_of([&] { attn::reference::attention(qv, kv, vv, ov, mask, mod, opt); });
      if (a != b) fail("flash and reference reject differently: '" + a + "' vs '" + b + "'");
      if (std::memcmp(before.data(), out.data.data(), before.size() * sizeof(O)) != 0)
        fail("output written before the error: " + a);
      if (plan.with_lse && std::any_of(lse.begin(), lse.end(), [](float x) { return x != 7.f; }))
        fail("lse written before the error: " + a);
    };
    const auto qs = q.view.shape(), ks = k.view.shape();
    switch (plan.corrupt) {
      case 1:  // k's head dim differs from q's
        run_both(q.cview(),
                 attn::Tensor4<const K>(k.view.data(), {ks[0], ks[1], ks[2], ks[3] - 1},
                                        k.view.strides()),
                 v.cview(), out.view);
        break;
      case 2:  // out on top of q
        run_both(q.cview(), k.cview(), v.cview(),
                 attn::Tensor4<O>(reinterpret_cast<O*>(const_cast<Q*>(q.view.data())),
                                  out.view.shape(), out.view.strides()));
        break;
      case 3:  // a zero extent
        run_both(attn::Tensor4<const Q>(q.view.data(), {qs[0], qs[1], 0, qs[3]}, q.view.strides()),
                 k.cview(), v.cview(), out.view);
        break;
      case 4:  // a scale that is not finite
        opt.scale = std::numeric_limits<double>::infinity();
        run_both(q.cview(), k.cview(), v.cview(), out.view);
        break;
      default:  // a negative block size
        opt.block_k = -1;
        run_both(q.cview(), k.cview(), v.cview(), out.view);
        break;
    }
    return;
  }

  attn::masked_attention(q.cview(), k.cview(), v.cview(), out.view, mask, mod, opt);
  attn::reference::attention(q.cview(), k.cview(), v.cview(), ref, mask, mod, ref_opt);

  // Bytes in the gaps of the output view are untouched: compare the written
  // buffer with `before` after copying the view's elements back.
  {
    std::vector<O> gaps = out.data;
    const attn::Tensor4<O> g(gaps.data(), out.view.shape(), out.view.strides());
    const attn::Tensor4<const O> b(before.data(), out.view.shape(), out.view.strides());
    for (index_t bb = 0; bb < s.batch; ++bb)
      for (index_t h = 0; h < s.q_heads; ++h)
        for (index_t i = 0; i < s.lq; ++i)
          for (index_t c = 0; c < s.dv; ++c) g(bb, h, i, c) = b(bb, h, i, c);
    if (std::memcmp(gaps.data(), before.data(), before.size() * sizeof(O)) != 0)
      fail("a byte outside the output view was written");
  }

  // Tolerance (tests/support.hpp's model): score error ~ eps·smax with smax a
  // bound on |score|, a random walk over D and Lk, one rounding of the output.
  using Acc = attn::detail::accum_t<Q, K, V, O>;
  const double scale = std::abs(plan.opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d))));
  double smax = scale * max_row_norm(q.view) * max_row_norm(k.view);
  if (plan.mod == 1 || plan.mod == 4)
    smax += static_cast<double>(s.lq + s.lk);  // ALiBi slopes <= 1
  if (plan.mod == 3) {
    double bias_max = 0;
    for (float b : plan.bias) bias_max = std::max(bias_max, std::abs(static_cast<double>(b)));
    smax += bias_max;
  }
  const double vmax = std::max(v.max_abs(), 1.0);
  const double acc_eps = static_cast<double>(std::numeric_limits<Acc>::epsilon());
  const double score_tol =
      8.0 * acc_eps *
      (std::sqrt(static_cast<double>(s.d)) + std::sqrt(static_cast<double>(s.lk)) + smax);
  const double tol = score_tol * vmax + storage_eps<O>() * vmax;

  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h)
      for (index_t i = 0; i < s.lq; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * s.q_heads + h) * s.lq + i);
        const bool empty = plan.with_lse && std::isinf(lse_ref[row]);
        for (index_t c = 0; c < s.dv; ++c) {
          const double x = static_cast<double>(out.view(b, h, i, c)), y = ref(b, h, i, c);
          if (empty ? x != 0.0 : !(std::abs(x - y) <= tol))
            fail("output (" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                 std::to_string(i) + ", " + std::to_string(c) + ") is " + std::to_string(x) +
                 ", reference " + std::to_string(y) + ", tolerance " + std::to_string(tol));
        }
        if (!plan.with_lse) continue;
        if (empty ? lse[row] != lse_ref[row]
                  : !(std::abs(static_cast<double>(lse[row]) - lse_ref[row]) <=
                      (score_tol + 1e-6) * (1.0 + std::abs(static_cast<double>(lse_ref[row])))))
          fail("lse of row " + std::to_string(row) + " is " + std::to_string(lse[row]) +
               ", reference " + std::to_string(lse_ref[row]));
      }

  // The same call with another thread count gives the same bits.
  Buffer<O> again = out;
  again.view = attn::Tensor4<O>(again.data.data(), out.view.shape(), out.view.strides());
  attn::AttentionOptions other = opt;
  other.num_threads = opt.num_threads == 1 ? 2 : 1;
  attn::masked_attention(q.cview(), k.cview(), v.cview(), again.view, mask, mod, other);
  if (std::memcmp(again.data.data(), out.data.data(), out.data.size() * sizeof(O)) != 0)
    fail("results differ between 1 and 2 threads");
}

// ------------------------------------------------------------- dispatch --

// Every (storage types, mask, modifier) triple is an engine instantiation, and
// the full cross product (270) took clang over 10 minutes to build with the
// sanitizers. The engine applies modifiers and masks in separate steps, so the
// target instantiates: for float, every mask and every modifier under no mask,
// causal and a window; for double, every mask and every modifier under causal;
// for the half/bfloat16 storages, four masks and every modifier under no mask.
// decode_coverage() maps a decoded (mask, mod) onto that set.
enum Coverage { kFloat, kDouble, kReduced };

void decode_coverage(Coverage c, Plan& plan) {
  static const int reduced_masks[] = {0, 1, 4, 8};
  if (c == kReduced) plan.mask = reduced_masks[plan.mask % 4];
  const bool mods = c == kFloat    ? plan.mask == 0 || plan.mask == 1 || plan.mask == 7
                    : c == kDouble ? plan.mask == 1
                                   : plan.mask == 0;
  if (!mods) plan.mod = 0;
}

template <bool Mods, class Q, class K, class V, class O, class Mask>
void with_mod(const Buffer<Q>& q, const Buffer<K>& k, const Buffer<V>& v, Buffer<O>& out,
              const Mask& mask, Plan& plan) {
  if constexpr (!Mods) {
    return check(q, k, v, out, mask, attn::no_score_mod(), plan);
  } else {
    const auto& s = plan.s;
    std::vector<double> slopes = attn::alibi_slopes(s.q_heads);
    switch (plan.mod) {
      case 0:
        return check(q, k, v, out, mask, attn::no_score_mod(), plan);
      case 1:
        return check(q, k, v, out, mask, attn::alibi(slopes), plan);
      case 2:
        return check(q, k, v, out, mask, attn::softcap(plan.cap), plan);
      case 3:
        return check(q, k, v, out, mask,
                     attn::additive_bias(attn::bhsd(static_cast<const float*>(plan.bias.data()),
                                                    plan.bias_b, s.q_heads, s.lq, s.lk)),
                     plan);
      default:
        return check(q, k, v, out, mask,
                     attn::compose(attn::alibi(slopes), attn::softcap(plan.cap)), plan);
    }
  }
}

template <Coverage C, class Q, class K, class V, class O>
void with_mask(const Buffer<Q>& q, const Buffer<K>& k, const Buffer<V>& v, Buffer<O>& out,
               Plan& plan) {
  const auto& s = plan.s;
  constexpr bool all = C != kReduced;
  switch (plan.mask) {
    case 0:
      return with_mod<C != kDouble>(q, k, v, out, attn::no_mask(), plan);
    case 1:
      return with_mod<C != kReduced>(q, k, v, out, attn::causal(), plan);
    case 4:
      return with_mod<false>(q, k, v, out,
                             attn::bool_mask(attn::bhsd(static_cast<const bool*>(plan.keep.get()),
                                                        plan.mask_b, plan.mask_h, s.lq, s.lk)),
                             plan);
    case 8: {
      const index_t left = static_cast<index_t>(plan.seed % 20);
      return with_mod<false>(q, k, v, out, attn::window(left, 0) & attn::key_padding(plan.lengths),
                             plan);
    }
    default:
      break;
  }
  if constexpr (all) {
    switch (plan.mask) {
      case 2:
        return with_mod<false>(q, k, v, out, attn::causal_top_left(), plan);
      case 3:
        return with_mod<false>(q, k, v, out, attn::key_padding(plan.lengths), plan);
      case 5: {
        const index_t m = 2 + static_cast<index_t>(plan.seed % 5);
        return with_mod<false>(q, k, v, out,
                               attn::custom_mask([m](index_t, index_t h, index_t i, index_t j) {
                                 return (i * 7 + j * 3 + h) % m != 0;
                               }),
                               plan);
      }
      case 6:
        return with_mod<false>(q, k, v, out, attn::causal() & attn::key_padding(plan.lengths),
                               plan);
      default: {  // 7: a band of left/right keys, -1 = unbounded on that side
        const index_t left = static_cast<index_t>(plan.seed % 14) - 1;
        const index_t right = static_cast<index_t>((plan.seed / 14) % 14) - 1;
        return with_mod<C == kFloat>(q, k, v, out, attn::window(left, right), plan);
      }
    }
  }
  fail("mask " + std::to_string(plan.mask) + " is outside this storage's coverage");
}

template <Coverage C, class Q, class K, class V, class O>
void run_types(Bytes& in, Plan& plan) {
  decode_coverage(C, plan);
  const auto& s = plan.s;
  Buffer<Q> q(s.batch, s.q_heads, s.lq, s.d, in);
  Buffer<K> k(s.batch, s.kv_heads, s.lk, s.d, in);
  Buffer<V> v(s.batch, s.kv_heads, s.lk, s.dv, in);
  Buffer<O> out(s.batch, s.q_heads, s.lq, s.dv, in);
  std::mt19937 gen(plan.seed);
  q.fill(gen, plan.amp);
  k.fill(gen, plan.amp);
  v.fill(gen, 1.0);
  out.fill(gen, 1.0);
  with_mask<C>(q, k, v, out, plan);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  Plan plan;
  const int types = static_cast<int>(in.range(0, 5));
  auto& s = plan.s;
  s.batch = in.range(1, 2);
  s.kv_heads = in.range(1, 3);
  s.q_heads = s.kv_heads * in.range(1, 3);
  s.lq = in.range(1, 40);
  s.lk = in.range(1, 40);
  s.d = in.range(1, 24);
  s.dv = in.range(1, 24);
  plan.mask = static_cast<int>(in.range(0, 8));
  plan.mod = static_cast<int>(in.range(0, 4));
  const double amps[] = {0.1, 1.0, 3.0, 30.0};
  plan.amp = amps[in.range(0, 3)];
  plan.seed = in.byte() | static_cast<std::uint32_t>(in.byte()) << 8;
  if (in.flag()) plan.opt.scale = static_cast<double>(in.range(-40, 40)) / 16.0;
  plan.opt.block_q = in.range(0, 48);
  plan.opt.block_k = in.range(0, 48);
  plan.opt.num_threads = static_cast<int>(in.range(0, 2));
  plan.with_lse = in.flag();
  plan.cap = static_cast<double>(in.range(1, 60)) / 4.0;
  plan.corrupt = in.range(0, 15) < 14 ? 0 : static_cast<int>(in.range(1, 5));

  for (index_t b = 0; b < s.batch; ++b) plan.lengths.push_back(in.range(0, s.lk));
  plan.mask_b = in.flag() ? s.batch : 1;
  plan.mask_h = in.flag() ? s.q_heads : 1;
  const index_t keep_n = plan.mask_b * plan.mask_h * s.lq * s.lk;
  plan.keep.reset(new bool[static_cast<std::size_t>(keep_n)]);
  const int density = static_cast<int>(in.range(0, 4));  // 0: all false ... 4: all true
  std::mt19937 gen(plan.seed + 1);
  for (index_t i = 0; i < keep_n; ++i)
    plan.keep[static_cast<std::size_t>(i)] = static_cast<int>(gen() % 4) < density;
  plan.bias_b = in.flag() ? s.batch : 1;
  std::normal_distribution<float> dist(0.f, 2.f);
  plan.bias.resize(static_cast<std::size_t>(plan.bias_b * s.q_heads * s.lq * s.lk));
  for (auto& x : plan.bias) x = dist(gen);

  using H = Eigen::half;
  using BF = Eigen::bfloat16;
  switch (types) {
    case 0:
      run_types<kFloat, float, float, float, float>(in, plan);
      break;
    case 1:
      run_types<kDouble, double, double, double, double>(in, plan);
      break;
    case 2:
      run_types<kReduced, H, H, H, H>(in, plan);
      break;
    case 3:
      run_types<kReduced, BF, BF, BF, BF>(in, plan);
      break;
    case 4:
      run_types<kReduced, float, BF, BF, float>(in, plan);
      break;
    default:
      run_types<kReduced, H, H, H, float>(in, plan);
      break;
  }
  return 0;
}
