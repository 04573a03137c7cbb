// fuzz/fuzz_layers.cpp — libFuzzer target: the attention layers
// (MultiHeadAttention, CrossAttention, the free functions and attn::linear)
// against an fp64 layer written out here, on sizes, weight layouts and
// strides, fused QKV, biases, masks and options decoded from the fuzz input.
//
// Build and run: scripts/ci-fuzz.sh (clang++ -fsanitize=fuzzer,address,undefined).
// The target aborts (a libFuzzer crash) when
//   - an output differs from the reference beyond the derived tolerance,
//   - the layer object, the free function and every weight form (in_out,
//     PyTorch out_in, fused, strided: gaps, negative, zero strides) do not
//     give the same bits, or one and two threads differ,
//   - a byte of the output buffer outside the view is written,
//   - a deliberately broken argument (lse or out over an input, a wrong
//     weight shape, a mask of the wrong length) is not rejected with
//     attn::Error, or anything is written before the rejection;
// and sanitizers report any memory error or undefined behaviour.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <array>
#include <cmath>
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
using attn::WeightLayout;

using attn_fuzz::Bytes;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_layers: %s\n", what.c_str());
  std::abort();
}

using Mat = std::vector<double>;  // row-major

/// One weight [in, out] (values in fp64) stored in a decoded form: a buffer
/// and a view of it in a layout, with gaps, reversed or zero strides.
struct StoredWeight {
  std::vector<float> buf;
  attn::TensorView<const float, 2> view;
  WeightLayout layout = WeightLayout::in_out;

  StoredWeight(const Mat& w, index_t in, index_t out, Bytes& b) {
    layout = b.flag() ? WeightLayout::out_in : WeightLayout::in_out;
    const bool oi = layout == WeightLayout::out_in;
    const index_t r = oi ? out : in, c = oi ? in : out;  // stored shape
    auto at = [&](index_t i, index_t j) {                // stored (i, j) -> value
      return oi ? w[static_cast<std::size_t>(j * out + i)]
                : w[static_cast<std::size_t>(i * out + j)];
    };
    const int form = static_cast<int>(b.range(0, 4));
    const index_t gap = b.range(1, 3);
    if (form == 4 && c == 1 && r > 1) {
      // one column, every row equal: row stride 0 (a legal broadcast view)
      bool same = true;
      for (index_t i = 1; i < r; ++i) same = same && at(i, 0) == at(0, 0);
      if (same) {
        buf.assign(1, static_cast<float>(at(0, 0)));
        view = attn::TensorView<const float, 2>(buf.data(), {r, 1}, {0, 1});
        return;
      }
    }
    if (form == 3) {  // reversed rows and columns: negative strides
      buf.assign(static_cast<std::size_t>(r * c), 0.f);
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < c; ++j)
          buf[static_cast<std::size_t>((r - 1 - i) * c + (c - 1 - j))] =
              static_cast<float>(at(i, j));
      view = attn::TensorView<const float, 2>(buf.data() + (r * c - 1), {r, c}, {-c, -1});
      return;
    }
    if (form == 2) {  // column order (the transpose stored row-major)
      buf.assign(static_cast<std::size_t>(r * c), 0.f);
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < c; ++j)
          buf[static_cast<std::size_t>(j * r + i)] = static_cast<float>(at(i, j));
      view = attn::TensorView<const float, 2>(buf.data(), {r, c}, {1, r});
      return;
    }
    const index_t es = form == 1 ? gap : 1, row = c * es + (form == 1 ? gap : 0);
    buf.assign(static_cast<std::size_t>(r * row), -99.f);
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < c; ++j)
        buf[static_cast<std::size_t>(i * row + j * es)] = static_cast<float>(at(i, j));
    view = attn::TensorView<const float, 2>(buf.data(), {r, c}, {row, es});
  }
};

/// Values rounded through float, N(0, 1/fan_in); a column vector when out == 1
/// is sometimes constant (so the zero-stride form can be drawn).
Mat random_weight(index_t in, index_t out, std::mt19937& gen, bool constant) {
  std::normal_distribution<double> d(0.0, 1.0 / std::sqrt(double(in)));
  Mat m(static_cast<std::size_t>(in * out));
  for (auto& x : m) x = static_cast<double>(static_cast<float>(d(gen)));
  if (constant && out == 1)
    for (auto& x : m) x = m[0];
  return m;
}

/// y[rows, out] = x[rows, in]·W + b in fp64.
Mat matmul(const Mat& x, index_t rows, index_t in, const Mat& w, index_t out, const Mat& b) {
  Mat y(static_cast<std::size_t>(rows * out));
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < out; ++c) {
      double s = b.empty() ? 0.0 : b[static_cast<std::size_t>(c)];
      for (index_t p = 0; p < in; ++p)
        s += x[static_cast<std::size_t>(r * in + p)] * w[static_cast<std::size_t>(p * out + c)];
      y[static_cast<std::size_t>(r * out + c)] = s;
    }
  return y;
}

struct Problem {
  attn::MultiHeadConfig c;
  bool cross = false, bias = false, fused = false;
  index_t B = 1, Lq = 1, Lk = 1;
  int mask = 0;  // 0 none, 1 causal, 2 key_padding, 3 HF bool mask [B, 1, 1, Lk]
  std::vector<index_t> lengths;
  std::unique_ptr<bool[]> hf;
  Mat x, mem, wq, wk, wv, wo, bq, bk, bv, bo;
  bool keep(index_t b, index_t i, index_t j) const {
    if (mask == 1) return j <= i + (Lk - Lq);
    if (mask >= 2) return j < lengths[static_cast<std::size_t>(b)];
    return true;
  }
};

/// The reference layer in fp64: [B·Lq, d_model].
Mat reference(const Problem& p) {
  const auto& c = p.c;
  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                nv = c.kv_heads * c.v_head_dim, group = c.q_heads / c.kv_heads;
  const Mat& src = p.cross ? p.mem : p.x;
  const index_t din = p.cross ? c.d_kv_in : c.d_model;
  const Mat q = matmul(p.x, p.B * p.Lq, c.d_model, p.wq, nq, p.bq);
  const Mat k = matmul(src, p.B * p.Lk, din, p.wk, nk, p.bk);
  const Mat v = matmul(src, p.B * p.Lk, din, p.wv, nv, p.bv);
  Mat heads(static_cast<std::size_t>(p.B * p.Lq * c.q_heads * c.v_head_dim), 0.0);
  const double scale = 1.0 / std::sqrt(double(c.head_dim));
  std::vector<double> s(static_cast<std::size_t>(p.Lk));
  for (index_t b = 0; b < p.B; ++b)
    for (index_t h = 0; h < c.q_heads; ++h)
      for (index_t i = 0; i < p.Lq; ++i) {
        const index_t g = h / group;
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < p.Lk; ++j) {
          double dot = 0;
          for (index_t d = 0; d < c.head_dim; ++d)
            dot += q[static_cast<std::size_t>((b * p.Lq + i) * nq + h * c.head_dim + d)] *
                   k[static_cast<std::size_t>((b * p.Lk + j) * nk + g * c.head_dim + d)];
          s[static_cast<std::size_t>(j)] =
              p.keep(b, i, j) ? scale * dot : -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[static_cast<std::size_t>(j)]);
        }
        if (std::isinf(mx)) continue;  // sees no key: zeros
        double sum = 0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (index_t j = 0; j < p.Lk; ++j)
          for (index_t d = 0; d < c.v_head_dim; ++d)
            heads[static_cast<std::size_t>((b * p.Lq + i) * c.q_heads * c.v_head_dim +
                                           h * c.v_head_dim + d)] +=
                s[static_cast<std::size_t>(j)] / sum *
                v[static_cast<std::size_t>((b * p.Lk + j) * nv + g * c.v_head_dim + d)];
      }
  return matmul(heads, p.B * p.Lq, c.q_heads * c.v_head_dim, p.wo, c.d_model, p.bo);
}

/// The output buffer with guard bytes around a padded view.
struct Out {
  std::vector<float> buf;
  attn::TensorView<float, 3> view;
  Out(index_t B, index_t L, index_t d, index_t pad) {
    buf.assign(static_cast<std::size_t>(B * L * (d + pad) + 8), 1234.5f);
    view = attn::TensorView<float, 3>(buf.data() + 4, {B, L, d}, {L * (d + pad), d + pad, 1});
  }
  void check_guards(index_t d, index_t pad) const {
    const index_t B = view.extent(0), L = view.extent(1);
    for (std::size_t i = 0; i < buf.size(); ++i) {
      const index_t off = static_cast<index_t>(i) - 4;
      const bool inside = off >= 0 && off < B * L * (d + pad) && off % (d + pad) < d;
      if (!inside && buf[i] != 1234.5f) fail("a byte outside the output view was written");
    }
  }
};

template <class F>
void expect_rejected(F&& call, const std::vector<float>& watch_before,
                     const std::vector<float>& watch, const char* what) {
  try {
    call();
  } catch (const attn::Error&) {
    if (watch != watch_before) fail(std::string("written before rejecting ") + what);
    return;
  }
  fail(std::string("accepted ") + what);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  Problem p;
  auto& c = p.c;
  c.kv_heads = in.range(1, 3);
  c.q_heads = c.kv_heads * in.range(1, 3);
  c.head_dim = in.range(1, 9);
  c.v_head_dim = in.range(1, 9);
  c.d_model = in.range(1, 20);
  p.cross = in.flag();
  c.d_kv_in = p.cross ? in.range(1, 12) : c.d_model;
  p.B = in.range(1, 3);
  p.Lq = in.range(1, 24);
  p.Lk = p.cross ? in.range(1, 24) : p.Lq;
  p.bias = in.flag();
  p.fused = !p.cross && in.flag();
  p.mask = static_cast<int>(in.range(0, 3));
  const int threads = static_cast<int>(in.range(1, 3));
  const index_t pad = in.range(0, 3);
  const int corrupt = in.range(0, 11) < 10 ? 0 : static_cast<int>(in.range(1, 4));
  std::mt19937 gen(in.byte() | static_cast<std::uint32_t>(in.byte()) << 8);
  for (index_t b = 0; b < p.B; ++b) p.lengths.push_back(in.range(0, p.Lk));
  p.hf.reset(new bool[static_cast<std::size_t>(p.B * p.Lk)]);
  for (index_t b = 0; b < p.B; ++b)
    for (index_t j = 0; j < p.Lk; ++j)
      p.hf[static_cast<std::size_t>(b * p.Lk + j)] = j < p.lengths[static_cast<std::size_t>(b)];

  const index_t nq = c.q_heads * c.head_dim, nk = c.kv_heads * c.head_dim,
                nv = c.kv_heads * c.v_head_dim, no = c.q_heads * c.v_head_dim;
  std::normal_distribution<double> unit(0.0, 1.0);
  auto rounded = [&](index_t n, double sd) {
    Mat m(static_cast<std::size_t>(n));
    for (auto& x : m) x = static_cast<double>(static_cast<float>(sd * unit(gen)));
    return m;
  };
  p.x = rounded(p.B * p.Lq * c.d_model, 1.0);
  if (p.cross) p.mem = rounded(p.B * p.Lk * c.d_kv_in, 1.0);
  const bool constant = in.flag();
  p.wq = random_weight(c.d_model, nq, gen, constant);
  p.wk = random_weight(c.d_kv_in, nk, gen, constant);
  p.wv = random_weight(c.d_kv_in, nv, gen, constant);
  p.wo = random_weight(no, c.d_model, gen, constant);
  if (p.bias) {
    p.bq = rounded(nq, 0.5);
    p.bk = rounded(nk, 0.5);
    p.bv = rounded(nv, 0.5);
    p.bo = rounded(c.d_model, 0.5);
  }
  auto fvec = [](const Mat& m) { return std::vector<float>(m.begin(), m.end()); };
  const std::vector<float> xf = fvec(p.x), memf = fvec(p.mem), bqf = fvec(p.bq), bkf = fvec(p.bk),
                           bvf = fvec(p.bv), bof = fvec(p.bo);
  auto vec = [](const std::vector<float>& v) {
    return v.empty() ? attn::TensorView<const float, 1>()
                     : attn::TensorView<const float, 1>(v.data(), {static_cast<index_t>(v.size())});
  };
  const attn::TensorView<const float, 3> xv(xf.data(), {p.B, p.Lq, c.d_model});
  const attn::TensorView<const float, 3> mv(p.cross ? memf.data() : xf.data(),
                                            {p.B, p.Lk, c.d_kv_in});

  // The weights in decoded forms, for the free function.
  StoredWeight sq(p.wq, c.d_model, nq, in), sk(p.wk, c.d_kv_in, nk, in),
      sv(p.wv, c.d_kv_in, nv, in), so(p.wo, no, c.d_model, in);
  attn::MultiHeadWeights<float> fw;
  std::vector<float> fused_w, fused_b;
  if (p.fused) {
    // PyTorch's in_proj_weight: [nq + nk + nv, d_model]
    const index_t tot = nq + nk + nv;
    fused_w.assign(static_cast<std::size_t>(tot * c.d_model), 0.f);
    for (index_t r = 0; r < tot; ++r)
      for (index_t i = 0; i < c.d_model; ++i) {
        const Mat& w = r < nq ? p.wq : r < nq + nk ? p.wk : p.wv;
        const index_t col = r < nq ? r : r < nq + nk ? r - nq : r - nq - nk;
        const index_t width = r < nq ? nq : r < nq + nk ? nk : nv;
        fused_w[static_cast<std::size_t>(r * c.d_model + i)] =
            static_cast<float>(w[static_cast<std::size_t>(i * width + col)]);
      }
    fw.layout = WeightLayout::out_in;
    fw.wqkv = attn::TensorView<const float, 2>(fused_w.data(), {tot, c.d_model});
    if (p.bias) {
      fused_b = bqf;
      fused_b.insert(fused_b.end(), bkf.begin(), bkf.end());
      fused_b.insert(fused_b.end(), bvf.begin(), bvf.end());
      fw.bqkv = vec(fused_b);
    }
    // wo must share the layout: store it transposed
    fw.wo = attn::in_out_view(so.view, so.layout);  // logical [in, out] ...
    fw.wo =
        attn::TensorView<const float, 2>(fw.wo.data(), {fw.wo.extent(1), fw.wo.extent(0)},
                                         {fw.wo.stride(1), fw.wo.stride(0)});  // ... as [out, in]
  } else {
    // each weight in its own layout, passed as the logical [in, out] view
    fw.wq = attn::in_out_view(sq.view, sq.layout);
    fw.wk = attn::in_out_view(sk.view, sk.layout);
    fw.wv = attn::in_out_view(sv.view, sv.layout);
    fw.wo = attn::in_out_view(so.view, so.layout);
    fw.bq = vec(bqf);
    fw.bk = vec(bkf);
    fw.bv = vec(bvf);
  }
  fw.bo = vec(bof);

  // The layer object, loaded through the layout-taking setters.
  attn::MultiHeadConfig lc = c;
  std::unique_ptr<attn::MultiHeadAttention<float>> self;
  std::unique_ptr<attn::CrossAttention<float>> cross;
  attn::AttentionProjections<float>* proj = nullptr;
  if (p.cross)
    proj = (cross = std::make_unique<attn::CrossAttention<float>>(lc)).get();
  else
    proj = (self = std::make_unique<attn::MultiHeadAttention<float>>(lc)).get();
  proj->set_wq(sq.view, sq.layout);
  proj->set_wk(sk.view, sk.layout);
  proj->set_wv(sv.view, sv.layout);
  proj->set_wo(so.view, so.layout);
  if (p.bias) {
    proj->set_bq(bqf.data(), nq);
    proj->set_bk(bkf.data(), nk);
    proj->set_bv(bvf.data(), nv);
    proj->set_bo(bof.data(), c.d_model);
  }

  auto run = [&](int which, const attn::TensorView<float, 3>& out, int nthreads,
                 attn::AttentionOptions opt) {
    opt.num_threads = nthreads;
    auto go = [&](const auto& mask) {
      if (p.cross) {
        if (which == 0)
          cross->forward(xv, mv, out, mask, opt);
        else
          attn::cross_attention<float>(xv, mv, out, c, fw, mask, attn::no_score_mod(), opt);
      } else {
        if (which == 0)
          self->forward(xv, out, mask, opt);
        else
          attn::multi_head_attention<float>(xv, out, c, fw, mask, attn::no_score_mod(), opt);
      }
    };
    switch (p.mask) {
      case 1:
        go(attn::causal());
        break;
      case 2:
        go(attn::key_padding(p.lengths));
        break;
      case 3:
        go(attn::bool_mask(attn::TensorView<const bool, 4>(p.hf.get(), {p.B, 1, 1, p.Lk})));
        break;
      default:
        go(attn::no_mask());
    }
  };

  if (corrupt) {
    Out out(p.B, p.Lq, c.d_model, pad);
    const std::vector<float> before = out.buf;
    attn::AttentionOptions opt;
    std::vector<float> xcopy = xf;
    const std::vector<float> x_before = xcopy;
    const attn::TensorView<const float, 3> xc(xcopy.data(), {p.B, p.Lq, c.d_model});
    if (corrupt == 1) {  // lse laid over x
      opt.lse = attn::TensorView<float, 3>(xcopy.data(), {p.B, c.q_heads, p.Lq});
      expect_rejected(
          [&] {
            if (p.cross)
              cross->forward(xc, mv, out.view, attn::no_mask(), opt);
            else
              self->forward(xc, out.view, attn::no_mask(), opt);
          },
          x_before, xcopy, "options.lse over x");
    } else if (corrupt == 2) {  // out laid over x
      const attn::TensorView<float, 3> ov(xcopy.data(), {p.B, p.Lq, c.d_model});
      expect_rejected(
          [&] {
            if (p.cross)
              attn::cross_attention<float>(xc, mv, ov, c, fw);
            else
              attn::multi_head_attention<float>(xc, ov, c, fw);
          },
          x_before, xcopy, "out over x");
    } else if (corrupt == 3) {  // Wo of the wrong shape
      attn::MultiHeadWeights<float> bad = fw;
      bad.wo = attn::TensorView<const float, 2>(
          bad.wo.data(), {bad.wo.extent(0) + 1, bad.wo.extent(1)}, bad.wo.strides());
      expect_rejected(
          [&] {
            if (p.cross)
              attn::cross_attention<float>(xv, mv, out.view, c, bad);
            else
              attn::multi_head_attention<float>(xv, out.view, c, bad);
          },
          before, out.buf, "a wrong Wo shape");
    } else {  // key padding with one length too many
      std::vector<index_t> more = p.lengths;
      more.push_back(0);
      expect_rejected(
          [&] {
            if (p.cross)
              cross->forward(xv, mv, out.view, attn::key_padding(more));
            else
              self->forward(xv, out.view, attn::key_padding(more));
          },
          before, out.buf, "a key_padding of the wrong batch");
    }
    return 0;
  }

  // Layer (threads) against free function (1 thread) and the reference.
  Out a(p.B, p.Lq, c.d_model, pad), b(p.B, p.Lq, c.d_model, pad);
  run(0, a.view, threads, {});
  run(1, b.view, 1, {});
  a.check_guards(c.d_model, pad);
  b.check_guards(c.d_model, pad);
  const Mat ref = reference(p);
  const double eps = std::ldexp(1.0, -23);
  const double tol =
      64.0 * eps *
      (std::sqrt(double(c.d_model)) + std::sqrt(double(c.d_kv_in)) + std::sqrt(double(no)) +
       std::sqrt(double(c.head_dim)) * 4.0 + std::sqrt(double(p.Lk)) + 4.0);
  for (index_t bb = 0; bb < p.B; ++bb)
    for (index_t i = 0; i < p.Lq; ++i)
      for (index_t d = 0; d < c.d_model; ++d) {
        const float va = a.view(bb, i, d), vb = b.view(bb, i, d);
        if (std::memcmp(&va, &vb, sizeof(float)) != 0)
          fail("layer (" + std::to_string(threads) + " threads) and free function (1 thread, " +
               std::string(p.fused ? "fused" : "separate") + " weights) differ");
        const double r = ref[static_cast<std::size_t>((bb * p.Lq + i) * c.d_model + d)];
        if (!(std::abs(double(va) - r) <= tol * std::max(1.0, std::abs(r))))
          fail("output " + std::to_string(va) + " vs reference " + std::to_string(r) + " at (" +
               std::to_string(bb) + ", " + std::to_string(i) + ", " + std::to_string(d) + ")");
      }

  // attn::linear of Wq in its stored form against the reference product.
  std::vector<float> y(static_cast<std::size_t>(p.B * p.Lq * nq));
  attn::linear<float>(xv, sq.view, sq.layout, vec(bqf),
                      attn::TensorView<float, 3>(y.data(), {p.B, p.Lq, nq}), threads);
  const Mat yq = matmul(p.x, p.B * p.Lq, c.d_model, p.wq, nq, p.bq);
  for (std::size_t i = 0; i < y.size(); ++i)
    if (!(std::abs(double(y[i]) - yq[i]) <=
          8.0 * eps * double(c.d_model + 1) * std::max(1.0, std::abs(yq[i]))))
      fail("linear differs from the reference product");
  return 0;
}
