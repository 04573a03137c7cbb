// fuzz/fuzz_backward.cpp — libFuzzer target: attn::attention_backward against
// the fp64 reference backward on problems decoded from the fuzz input.
//
// Build and run: scripts/ci-fuzz.sh [seconds] fuzz_backward.
// Each input decodes one problem: float or double storage, B <= 2, Hkv <= 2,
// Hq = Hkv·(1..3), Lq, Lk <= 32, D, Dv <= 16, a layout per tensor (head- or
// sequence-major, padded rows, element stride 1 or 2), a mask (none, causal,
// a window with either side bounded or not, key padding), a score modifier
// (none, ALiBi, soft-cap), dropout p, tiles and thread count. The forward's
// out and lse are the fp64 values rounded to storage (float lse for float,
// double lse for double), so the check isolates the backward. It aborts when
//   - dq, dk or dv differs from reference::attention_backward beyond the
//     derived tolerance,
//   - one and two worker threads give different bits,
//   - a byte in the gaps of a strided gradient view is written,
//   - a deliberately broken argument (about 1 input in 8) is not rejected
//     with attn::Error, or a gradient byte changes before the rejection;
// and sanitizers report any memory error or undefined behaviour.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>
#include <attn/ops/backward.hpp>
#include <attn/reference/backward.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using attn::index_t;
using attn_fuzz::Bytes;
using attn_fuzz::max_row_norm;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_backward: %s\n", what.c_str());
  std::abort();
}

/// A logical [B, H, L, D] tensor in its own buffer with a decoded layout
/// (head- or sequence-major, padded rows, element stride 1 or 2).
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
  Buffer(const Buffer& o) : data(o.data), view(data.data(), o.view.shape(), o.view.strides()) {}
  Buffer& operator=(const Buffer&) = delete;

  void fill(std::mt19937& gen, double amp) {
    std::normal_distribution<double> dist(0.0, amp);
    for (auto& x : data) x = static_cast<T>(dist(gen));
  }
  attn::Tensor4<const T> cview() const { return view; }
  index_t extent(int i) const { return view.extent(i); }
};

/// Everything decoded besides the storage type.
struct Plan {
  attn::AttentionShape s;
  int mask = 0, mod = 0, corrupt = 0;
  double amp = 1, cap = 1;
  index_t left = 0, right = 0;   // window sides, -1 = unbounded
  std::vector<index_t> lengths;  // key padding
  std::uint32_t seed = 0;
  attn::AttentionOptions opt;
};

template <class F>
std::string error_of(F&& call) {
  try {
    call();
  } catch (const attn::Error& e) {
    return e.what();
  }
  fail("a broken argument was accepted");
}

// ------------------------------------------------------------ the forward --

/// out = (P ∘ M / (1 - p)) · V and lse of every row, in double, rounded to
/// storage: what a forward that is exact up to the final rounding writes.
template <class T, class L, class Mask, class Mod>
void exact_forward(const Buffer<T>& q, const Buffer<T>& k, const Buffer<T>& v, Buffer<T>& out,
                   std::vector<L>& lse, const Mask& mask, const Mod& mod, const Plan& plan) {
  const auto& s = plan.s;
  const Mask m = mask.bind(s);
  const Mod md = mod.bind(s);
  const double scale = plan.opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const auto drop =
      attn::detail::DropoutGen::bind(plan.opt.dropout, s.batch, s.q_heads, s.lq, s.lk);
  std::vector<double> p, l;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      attn::reference::probabilities(q.cview(), k.cview(), s, m, md, scale, b, h, p, l);
      const index_t hk = s.kv_head(h);
      for (index_t i = 0; i < s.lq; ++i) {
        lse[static_cast<std::size_t>((b * s.q_heads + h) * s.lq + i)] =
            static_cast<L>(l[static_cast<std::size_t>(i)]);
        for (index_t c = 0; c < s.dv; ++c) {
          double acc = 0;
          for (index_t j = 0; j < s.lk; ++j) {
            const double keep = drop.enabled ? (drop.keep(b, h, i, j) ? drop.inv_keep : 0.0) : 1.0;
            acc += p[static_cast<std::size_t>(i * s.lk + j)] * keep *
                   static_cast<double>(v.view(b, hk, j, c));
          }
          out.view(b, h, i, c) = static_cast<T>(acc);
        }
      }
    }
}

/// Magnitudes of the sums the gradients are made of: the reference backward
/// with |·| on every term (P ∘ M / (1 - p), |dO|·|V|, |Δ|, |score_mod'| <= 1).
/// A gradient's rounding error scales with these, not with the gradient,
/// which cancels (Σ_j P_ij (dP_ij - Δ_i) = 0).
struct Magnitudes {
  double dq = 0, dk = 0, dv = 0;
};

template <class T, class Mask, class Mod>
Magnitudes magnitudes(const Buffer<T>& q, const Buffer<T>& k, const Buffer<T>& v,
                      const Buffer<T>& dout, const Mask& mask, const Mod& mod, const Plan& plan) {
  const auto& s = plan.s;
  const Mask m = mask.bind(s);
  const Mod md = mod.bind(s);
  const double scale = plan.opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d)));
  const auto drop =
      attn::detail::DropoutGen::bind(plan.opt.dropout, s.batch, s.q_heads, s.lq, s.lk);
  const auto nk = static_cast<std::size_t>(s.batch * s.kv_heads * s.lk);
  std::vector<double> gk(nk * static_cast<std::size_t>(s.d)),
      gv(nk * static_cast<std::size_t>(s.dv));
  std::vector<double> p, l, dp(static_cast<std::size_t>(s.lk));
  Magnitudes r;
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.q_heads; ++h) {
      attn::reference::probabilities(q.cview(), k.cview(), s, m, md, scale, b, h, p, l);
      const index_t hk = s.kv_head(h);
      const std::size_t kv =
          static_cast<std::size_t>(b * s.kv_heads + hk) * static_cast<std::size_t>(s.lk);
      for (index_t i = 0; i < s.lq; ++i) {
        const double* pi = &p[static_cast<std::size_t>(i * s.lk)];
        double delta = 0;  // Σ_j P_ij |dP_ij|, a bound on |Δ_i|
        for (index_t j = 0; j < s.lk; ++j) {
          const double keep = drop.enabled ? (drop.keep(b, h, i, j) ? drop.inv_keep : 0.0) : 1.0;
          double a = 0;
          for (index_t c = 0; c < s.dv; ++c)
            a += std::abs(static_cast<double>(dout.view(b, h, i, c)) *
                          static_cast<double>(v.view(b, hk, j, c)));
          dp[static_cast<std::size_t>(j)] = a * keep;
          delta += pi[j] * dp[static_cast<std::size_t>(j)];
          for (index_t c = 0; c < s.dv; ++c)
            gv[(kv + static_cast<std::size_t>(j)) * static_cast<std::size_t>(s.dv) +
               static_cast<std::size_t>(c)] +=
                pi[j] * keep * std::abs(static_cast<double>(dout.view(b, h, i, c)));
        }
        for (index_t c = 0; c < s.d; ++c) {
          double gq = 0;
          for (index_t j = 0; j < s.lk; ++j) {
            const double dx = pi[j] * (dp[static_cast<std::size_t>(j)] + delta);
            gq += std::abs(scale) * dx * std::abs(static_cast<double>(k.view(b, hk, j, c)));
            gk[(kv + static_cast<std::size_t>(j)) * static_cast<std::size_t>(s.d) +
               static_cast<std::size_t>(c)] +=
                std::abs(scale) * dx * std::abs(static_cast<double>(q.view(b, h, i, c)));
          }
          r.dq = std::max(r.dq, gq);
        }
      }
    }
  for (double x : gk) r.dk = std::max(r.dk, x);
  for (double x : gv) r.dv = std::max(r.dv, x);
  return r;
}

// -------------------------------------------------------------- one check --

/// Gradient buffers of one call: dq like q, dk like k, dv like v.
template <class T>
struct Grads {
  Buffer<T> dq, dk, dv;
  Grads(const Plan& p, Bytes& in)
      : dq(p.s.batch, p.s.q_heads, p.s.lq, p.s.d, in),
        dk(p.s.batch, p.s.kv_heads, p.s.lk, p.s.d, in),
        dv(p.s.batch, p.s.kv_heads, p.s.lk, p.s.dv, in) {}
  bool same_bytes(const Grads& o) const {
    auto eq = [](const Buffer<T>& a, const Buffer<T>& b) {
      return std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(T)) == 0;
    };
    return eq(dq, o.dq) && eq(dk, o.dk) && eq(dv, o.dv);
  }
};

/// Fails when `g` (after the call) differs from `before` outside its view.
template <class T>
void check_gaps(const Buffer<T>& g, const Buffer<T>& before, const char* name) {
  std::vector<T> copy = g.data;
  const attn::Tensor4<T> c(copy.data(), g.view.shape(), g.view.strides());
  for (index_t b = 0; b < g.extent(0); ++b)
    for (index_t h = 0; h < g.extent(1); ++h)
      for (index_t i = 0; i < g.extent(2); ++i)
        for (index_t d = 0; d < g.extent(3); ++d) c(b, h, i, d) = before.view(b, h, i, d);
  if (std::memcmp(copy.data(), before.data.data(), copy.size() * sizeof(T)) != 0)
    fail(std::string("a byte outside the view of ") + name + " was written");
}

template <class T, class Mask, class Mod>
void check(const Buffer<T>& q, const Buffer<T>& k, const Buffer<T>& v, const Buffer<T>& dout,
           Grads<T>& g, const Mask& mask, const Mod& mod, const Plan& plan) {
  using L = std::conditional_t<std::is_same<T, double>::value, double, float>;
  const auto& s = plan.s;
  Buffer<T> out = dout;  // same shape; overwritten below
  std::vector<L> lse(static_cast<std::size_t>(s.batch * s.q_heads * s.lq));
  exact_forward(q, k, v, out, lse, mask, mod, plan);
  const attn::TensorView<const L, 3> lse_view(lse.data(), {s.batch, s.q_heads, s.lq});
  const Grads<T> before = g;
  attn::AttentionOptions opt = plan.opt;

  auto call = [&](const auto& dq, const auto& dk, const auto& dv, const auto& lv,
                  const attn::AttentionOptions& o) {
    attn::attention_backward(q.cview(), k.cview(), v.cview(), out.cview(), lv, dout.cview(), dq, dk,
                             dv, mask, mod, o);
  };

  // Broken arguments: refused with attn::Error before any gradient byte changes.
  if (plan.corrupt) {
    const auto dqs = g.dq.view.shape();
    std::string msg;
    switch (plan.corrupt) {
      case 1:  // dq one row short
        msg = error_of([&] {
          call(attn::Tensor4<T>(g.dq.view.data(), {dqs[0], dqs[1], dqs[2] - 1, dqs[3]},
                                g.dq.view.strides()),
               g.dk.view, g.dv.view, lse_view, opt);
        });
        break;
      case 2:  // dk laid over dq
        msg = error_of([&] {
          call(g.dq.view,
               attn::Tensor4<T>(g.dq.view.data(), g.dk.view.shape(), g.dk.view.strides()),
               g.dv.view, lse_view, opt);
        });
        break;
      case 3:  // dv laid over dout
        msg = error_of([&] {
          call(g.dq.view, g.dk.view,
               attn::Tensor4<T>(const_cast<T*>(dout.view.data()), g.dv.view.shape(),
                                g.dv.view.strides()),
               lse_view, opt);
        });
        break;
      case 4:  // dropout p outside [0, 1)
        opt.dropout.p = plan.seed % 2 ? 1.0 : -0.25;
        msg = error_of([&] { call(g.dq.view, g.dk.view, g.dv.view, lse_view, opt); });
        break;
      case 5:  // lse of the wrong shape
        msg = error_of([&] {
          call(g.dq.view, g.dk.view, g.dv.view,
               attn::TensorView<const L, 3>(lse.data(), {s.batch, s.q_heads, s.lq + 1}), opt);
        });
        break;
      default:  // a dropout offset the counter cannot hold
        opt.dropout = {0.5, plan.seed, std::uint64_t{1} << 32};
        msg = error_of([&] { call(g.dq.view, g.dk.view, g.dv.view, lse_view, opt); });
        break;
    }
    if (!g.same_bytes(before)) fail("a gradient was written before the error: " + msg);
    return;
  }

  call(g.dq.view, g.dk.view, g.dv.view, lse_view, opt);
  check_gaps(g.dq, before.dq, "dq");
  check_gaps(g.dk, before.dk, "dk");
  check_gaps(g.dv, before.dv, "dv");

  // The reference in fp64 on the same (rounded) inputs.
  std::vector<double> rq(static_cast<std::size_t>(s.batch * s.q_heads * s.lq * s.d)),
      rk(static_cast<std::size_t>(s.batch * s.kv_heads * s.lk * s.d)),
      rv(static_cast<std::size_t>(s.batch * s.kv_heads * s.lk * s.dv));
  const auto ref_dq = attn::bhsd(rq.data(), s.batch, s.q_heads, s.lq, s.d);
  const auto ref_dk = attn::bhsd(rk.data(), s.batch, s.kv_heads, s.lk, s.d);
  const auto ref_dv = attn::bhsd(rv.data(), s.batch, s.kv_heads, s.lk, s.dv);
  attn::reference::attention_backward(q.cview(), k.cview(), v.cview(), dout.cview(), ref_dq, ref_dk,
                                      ref_dv, mask, mod, plan.opt);

  // Tolerance: tests/test_backward.cpp's grad_tolerance, 16·eps·(√D + √Lk + 4)·max(|ref|, 1),
  // with its two unit-input assumptions made explicit for decoded inputs: the
  // 4 (scores of unit-normal inputs) becomes a bound smax on |score| plus 4,
  // and |ref| becomes the magnitude of the summed terms (Magnitudes); dK and
  // dV sum over group·Lq query rows rather than Lk keys.
  const double scale = std::abs(plan.opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(s.d))));
  double smax = scale * max_row_norm(q.view) * max_row_norm(k.view);
  if (plan.mod == 1) smax += static_cast<double>(s.lq + s.lk);  // ALiBi slopes <= 1
  if (plan.mod == 2) smax = std::min(smax, plan.cap);
  const double eps = std::ldexp(1.0, 1 - std::numeric_limits<T>::digits);
  const Magnitudes mag = magnitudes(q, k, v, dout, mask, mod, plan);
  const double rows = static_cast<double>(std::max(s.lk, s.lq * (s.q_heads / s.kv_heads)));
  const double base = 16.0 * eps * (std::sqrt(static_cast<double>(s.d)) + 4.0 + smax);
  const double tol_q =
      (base + 16.0 * eps * std::sqrt(static_cast<double>(s.lk))) * std::max(mag.dq, 1.0);
  const double tol_k = (base + 16.0 * eps * std::sqrt(rows)) * std::max(mag.dk, 1.0);
  const double tol_v = (base + 16.0 * eps * std::sqrt(rows)) * std::max(mag.dv, 1.0);
  auto compare = [](const Buffer<T>& got, const attn::Tensor4<double>& ref, double tol,
                    const char* name) {
    for (index_t b = 0; b < got.extent(0); ++b)
      for (index_t h = 0; h < got.extent(1); ++h)
        for (index_t i = 0; i < got.extent(2); ++i)
          for (index_t c = 0; c < got.extent(3); ++c) {
            const double x = static_cast<double>(got.view(b, h, i, c)), y = ref(b, h, i, c);
            if (!(std::abs(x - y) <= tol))
              fail(std::string(name) + " (" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                   std::to_string(i) + ", " + std::to_string(c) + ") is " + std::to_string(x) +
                   ", reference " + std::to_string(y) + ", tolerance " + std::to_string(tol));
          }
  };
  compare(g.dq, ref_dq, tol_q, "dq");
  compare(g.dk, ref_dk, tol_k, "dk");
  compare(g.dv, ref_dv, tol_v, "dv");

  // The same call with another thread count gives the same bits.
  Grads<T> again = before;
  attn::AttentionOptions other = opt;
  other.num_threads = opt.num_threads == 1 ? 2 : 1;
  call(again.dq.view, again.dk.view, again.dv.view, lse_view, other);
  if (!again.same_bytes(g)) fail("gradients differ between 1 and 2 threads");
}

// ------------------------------------------------------------- dispatch --

// Each (storage, mask, modifier) triple instantiates the backward engine
// (about 5 s of clang under the sanitizers each). Float covers every mask
// with every modifier (12); double covers every mask without a modifier and
// the modifiers under causal (6). with_mask() folds a decoded (mask, mod)
// outside that set onto it.
template <bool Mods, class T, class Mask>
void with_mod(const Buffer<T>& q, const Buffer<T>& k, const Buffer<T>& v, const Buffer<T>& dout,
              Grads<T>& g, const Mask& mask, Plan& plan) {
  if constexpr (Mods) {
    switch (plan.mod) {
      case 1:
        return check(q, k, v, dout, g, mask, attn::alibi(attn::alibi_slopes(plan.s.q_heads)), plan);
      case 2:
        return check(q, k, v, dout, g, mask, attn::softcap(plan.cap), plan);
      default:
        break;
    }
  }
  plan.mod = 0;
  check(q, k, v, dout, g, mask, attn::no_score_mod(), plan);
}

template <class T>
void run(Bytes& in, Plan& plan) {
  constexpr bool all = std::is_same<T, float>::value;
  const auto& s = plan.s;
  Buffer<T> q(s.batch, s.q_heads, s.lq, s.d, in);
  Buffer<T> k(s.batch, s.kv_heads, s.lk, s.d, in);
  Buffer<T> v(s.batch, s.kv_heads, s.lk, s.dv, in);
  Buffer<T> dout(s.batch, s.q_heads, s.lq, s.dv, in);
  Grads<T> g(plan, in);
  std::mt19937 gen(plan.seed);
  q.fill(gen, plan.amp);
  k.fill(gen, plan.amp);
  v.fill(gen, 1.0);
  dout.fill(gen, 1.0);
  g.dq.fill(gen, 1.0);
  g.dk.fill(gen, 1.0);
  g.dv.fill(gen, 1.0);
  switch (plan.mask) {
    case 0:
      return with_mod<all>(q, k, v, dout, g, attn::no_mask(), plan);
    case 1:
      return with_mod<true>(q, k, v, dout, g, attn::causal(), plan);
    case 2:
      return with_mod<all>(q, k, v, dout, g, attn::window(plan.left, plan.right), plan);
    default:
      return with_mod<all>(q, k, v, dout, g, attn::key_padding(plan.lengths), plan);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  Plan plan;
  const bool dbl = in.flag();
  auto& s = plan.s;
  s.batch = in.range(1, 2);
  s.kv_heads = in.range(1, 2);
  s.q_heads = s.kv_heads * in.range(1, 3);
  s.lq = in.range(1, 32);
  s.lk = in.range(1, 32);
  s.d = in.range(1, 16);
  s.dv = in.range(1, 16);
  plan.mask = static_cast<int>(in.range(0, 3));
  plan.mod = static_cast<int>(in.range(0, 2));
  const double amps[] = {0.1, 1.0, 3.0, 10.0};
  plan.amp = amps[in.range(0, 3)];
  plan.seed = in.byte() | static_cast<std::uint32_t>(in.byte()) << 8;
  if (in.flag()) plan.opt.scale = static_cast<double>(in.range(-40, 40)) / 16.0;
  plan.opt.block_q = in.range(0, 40);
  plan.opt.block_k = in.range(0, 40);
  plan.opt.num_threads = static_cast<int>(in.range(0, 2));
  const double drop[] = {0.0, 0.0, 0.1, 0.5, 0.9};
  plan.opt.dropout = {drop[in.range(0, 4)], plan.seed * 2654435761u,
                      static_cast<std::uint64_t>(in.byte())};
  plan.cap = static_cast<double>(in.range(1, 60)) / 4.0;
  plan.left = in.range(-1, 12);
  plan.right = in.range(-1, 12);
  plan.corrupt = in.range(0, 15) < 14 ? 0 : static_cast<int>(in.range(1, 6));
  for (index_t b = 0; b < s.batch; ++b) plan.lengths.push_back(in.range(0, s.lk));

  if (dbl)
    run<double>(in, plan);
  else
    run<float>(in, plan);
  return 0;
}
