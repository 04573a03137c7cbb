// fuzz/fuzz_linear.cpp — libFuzzer target: linear attention, one-shot and
// carried through a state, against the fp64 reference.
//
// Each input decodes a problem (GQA, Lq != Lk, strided views, a feature map:
// elu + 1, ReLU or FAVOR+), options (causal, chunk, eps, threads) and a cut
// of the sequence into pieces. The target aborts when
//   - the one-shot output differs from reference::linear_attention beyond the
//     tolerance, or 1 and 2 threads give different bits,
//   - causal pieces carried through a LinearStateBuffer do not give the
//     one-shot result, or a non-causal call's state is not S and z of its keys,
//   - a broken state or option (a wrong shape, a state over q, k, v or out, a
//     state s over z, eps <= 0, a negative chunk) is accepted, or anything is
//     written before it is refused.
//
// Build and run: scripts/ci-fuzz.sh.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using attn::index_t;

using attn_fuzz::Bytes;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_linear: %s\n", what.c_str());
  std::abort();
}

template <class T>
struct Tensor {
  std::vector<T> data;
  attn::Tensor4<T> view;
  Tensor(index_t B, index_t H, index_t L, index_t D, bool seq_major, std::uint32_t seed,
         double amp) {
    data.resize(static_cast<std::size_t>(B * H * L * D));
    std::uint32_t x = seed * 2654435761u + 11;
    for (auto& a : data) {
      x = x * 1664525u + 1013904223u;
      a = static_cast<T>(amp * static_cast<double>(static_cast<int>(x >> 24) - 128) / 128.0);
    }
    view = seq_major ? attn::bshd(data.data(), B, L, H, D) : attn::bhsd(data.data(), B, H, L, D);
  }
  attn::Tensor4<const T> c() const { return view; }
  /// Rows [l0, l1) of every head.
  attn::Tensor4<T> rows(index_t l0, index_t l1) const {
    auto s = view.shape();
    s[2] = l1 - l0;
    return attn::Tensor4<T>(view.data() + l0 * view.stride(2), s, view.strides());
  }
};

template <class T, class Map>
void run(const Map& map, index_t B, index_t Hq, index_t Hkv, index_t Lq, index_t Lk, index_t D,
         index_t Dv, Bytes& in) {
  attn::LinearAttentionOptions opt;
  opt.causal = in.flag();
  opt.chunk = in.range(0, 30);
  opt.eps = in.flag() ? 1e-6 : 0.5;
  opt.num_threads = 1;
  const double amp = in.flag() ? 0.5 : 2.0;
  Tensor<T> q(B, Hq, Lq, D, in.flag(), 1, amp), k(B, Hkv, Lk, D, in.flag(), 2, amp),
      v(B, Hkv, Lk, Dv, in.flag(), 3, 1.0), out(B, Hq, Lq, Dv, in.flag(), 4, 1.0);
  const index_t F = map.num_features(D);

  // Broken arguments first: refused, nothing written.
  const int broken = static_cast<int>(in.range(0, 11));
  if (broken < 6) {
    attn::LinearStateBuffer<T> good(B, Hkv, F, Dv);
    attn::LinearState<T> st = good.state();
    attn::LinearAttentionOptions o = opt;
    std::vector<T> zbuf;
    switch (broken) {
      case 0:
        st.s = attn::Tensor4<T>(st.s.data(), {B, Hkv, F + 1, Dv});
        break;
      case 1:
        st.z = attn::TensorView<T, 3>(out.view.data(), {B, Hkv, F});
        break;  // z over out
      case 2:
        st.s = attn::Tensor4<T>(const_cast<T*>(q.view.data()), {B, Hkv, F, Dv});
        break;
      case 3:
        st.z = attn::TensorView<T, 3>(st.s.data(), {B, Hkv, F});
        break;  // z over s
      case 4:
        o.eps = in.flag() ? 0.0 : -1.0;
        break;
      default:
        o.chunk = -1;
        break;
    }
    const std::vector<T> before = out.data;
    const std::vector<T> q_before = q.data;
    try {
      attn::linear_attention(q.c(), k.c(), v.c(), out.view, map, st, o);
    } catch (const attn::Error&) {
      if (out.data != before || q.data != q_before) fail("written before the error");
      return;
    }
    // a broken state over out or q only overlaps when both are non-empty; all are here
    fail("broken argument " + std::to_string(broken) + " accepted");
  }

  // One shot against the reference.
  attn::linear_attention(q.c(), k.c(), v.c(), out.view, map, opt);
  std::vector<double> ref_buf(static_cast<std::size_t>(B * Hq * Lq * Dv));
  const auto ref = attn::bhsd(ref_buf.data(), B, Hq, Lq, Dv);
  attn::reference::linear_attention(q.c(), k.c(), v.c(), ref, map, opt);
  const double tol = std::is_same<T, float>::value ? 3e-3 : 1e-9;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hq; ++h)
      for (index_t i = 0; i < Lq; ++i)
        for (index_t c = 0; c < Dv; ++c) {
          const double x = static_cast<double>(out.view(b, h, i, c)), y = ref(b, h, i, c);
          if (!(std::abs(x - y) <= tol * (1 + std::abs(y))))
            fail("one-shot output differs: " + std::to_string(x) + " vs " + std::to_string(y));
        }
  {
    Tensor<T> again = out;
    again.view = attn::Tensor4<T>(again.data.data(), out.view.shape(), out.view.strides());
    attn::LinearAttentionOptions o2 = opt;
    o2.num_threads = 2;
    attn::linear_attention(q.c(), k.c(), v.c(), again.view, map, o2);
    if (again.data != out.data) fail("1 and 2 threads differ");
  }

  // Causal, Lq = Lk: pieces through a state give the one-shot result.
  if (opt.causal && Lq == Lk) {
    attn::LinearStateBuffer<T> state(B, Hkv, F, Dv);
    Tensor<T> pieces = out;
    pieces.view = attn::Tensor4<T>(pieces.data.data(), out.view.shape(), out.view.strides());
    std::fill(pieces.data.begin(), pieces.data.end(), T(0));
    index_t l0 = 0;
    while (l0 < Lq) {
      const index_t l1 = std::min(Lq, l0 + in.range(1, 16));
      attn::linear_attention(
          attn::Tensor4<const T>(q.rows(l0, l1)), attn::Tensor4<const T>(k.rows(l0, l1)),
          attn::Tensor4<const T>(v.rows(l0, l1)), pieces.rows(l0, l1), map, state.state(), opt);
      l0 = l1;
    }
    for (std::size_t i = 0; i < out.data.size(); ++i) {
      const double x = static_cast<double>(pieces.data[i]), y = static_cast<double>(out.data[i]);
      if (!(std::abs(x - y) <= tol * (1 + std::abs(y))))
        fail("pieces through a state differ: " + std::to_string(x) + " vs " + std::to_string(y));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const index_t B = in.range(1, 2), Hkv = in.range(1, 2), Hq = Hkv * in.range(1, 3);
  const index_t Lq = in.range(1, 40), Lk = in.byte() & 1 ? Lq : in.range(1, 40);
  const index_t D = in.range(1, 12), Dv = in.range(1, 12);
  const int map = static_cast<int>(in.range(0, 2));
  const bool dbl = in.flag();
  auto go = [&](const auto& m) {
    if (dbl)
      run<double>(m, B, Hq, Hkv, Lq, Lk, D, Dv, in);
    else
      run<float>(m, B, Hq, Hkv, Lq, Lk, D, Dv, in);
  };
  if (map == 0)
    go(attn::elu_plus_one());
  else if (map == 1)
    go(attn::relu());
  else
    go(attn::favor_plus(D, in.range(1, 16), in.byte()));
  return 0;
}
