// fuzz/fuzz_sparse.cpp — libFuzzer target: block-sparse layouts decoded from
// the input, and sparse_attention against the fp64 reference.
//
// Each input decodes a problem, block sizes and a layout in compressed rows:
// either valid rows (a bit per key block) or raw offsets and columns that
// may break every rule. The target aborts when
//   - a broken layout is accepted, or the constructor fails with anything but
//     attn::Error (or crashes),
//   - an accepted layout breaks its invariants (offsets from 0 to nnz,
//     non-decreasing; columns sorted, distinct, in range),
//   - from_block_mask on the same bits gives another layout, or the union of
//     two layouts lists a block neither lists (or misses one),
//   - sparse_attention differs from the reference with the layout as a mask
//     policy beyond the tolerance, a row that sees no key is not zeros with
//     lse -inf, or 1 and 2 threads give different bits,
//   - a layout that does not fit the problem is accepted by sparse_attention
//     or anything is written before it is refused.
//
// Build and run: scripts/ci-fuzz.sh.
#include "fuzz_bytes.hpp"

#include <attn/attn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace {

using attn::index_t;

using attn_fuzz::Bytes;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_sparse: %s\n", what.c_str());
  std::abort();
}

void check_invariants(const attn::BlockSparseLayout& l) {
  const auto& off = l.row_offsets();
  const auto& cols = l.cols();
  const index_t rows = l.heads() * l.q_blocks();
  if (static_cast<index_t>(off.size()) != rows + 1 || off.front() != 0 ||
      off.back() != static_cast<index_t>(cols.size()))
    fail("accepted layout with bad row offsets");
  for (index_t r = 0; r < rows; ++r) {
    const auto a = off[static_cast<std::size_t>(r)], e = off[static_cast<std::size_t>(r + 1)];
    if (e < a) fail("accepted layout with decreasing offsets");
    for (index_t i = a; i < e; ++i) {
      const index_t c = cols[static_cast<std::size_t>(i)];
      if (c < 0 || c >= l.k_blocks()) fail("accepted layout with a column out of range");
      if (i > a && c <= cols[static_cast<std::size_t>(i - 1)]) fail("accepted unsorted columns");
    }
  }
}

/// A layout from the input: valid rows from bits, or raw (possibly broken) arrays.
/// Returns false when the constructor refused it (with attn::Error).
bool decode_layout(Bytes& in, index_t bq, index_t bk, index_t qb, index_t kb, index_t heads,
                   bool raw, std::vector<bool>& bits, attn::BlockSparseLayout& out) {
  std::vector<index_t> off{0}, cols;
  bits.assign(static_cast<std::size_t>(heads * qb * kb), false);
  if (!raw) {
    for (index_t r = 0; r < heads * qb; ++r) {
      const int density = static_cast<int>(in.range(0, 3));  // 0: none ... 3: all
      for (index_t j = 0; j < kb; ++j) {
        const bool on = density == 3 || (density > 0 && static_cast<int>(in.range(0, 2)) < density);
        if (on) cols.push_back(j);
        bits[static_cast<std::size_t>(r * kb + j)] = on;
      }
      off.push_back(static_cast<index_t>(cols.size()));
    }
  } else {
    const index_t n_off = in.range(0, heads * qb + 2), n_cols = in.range(0, 2 * kb + 2);
    off.clear();
    for (index_t i = 0; i < n_off; ++i) off.push_back(in.range(-1, n_cols + 1));
    for (index_t i = 0; i < n_cols; ++i) cols.push_back(in.range(-1, kb));
  }
  try {
    out = attn::BlockSparseLayout(bq, bk, qb, kb, heads, off, cols);
  } catch (const attn::Error&) {
    return false;
  }
  return true;
}

template <class T>
struct Tensor {
  std::vector<T> data;
  attn::Tensor4<T> view;
  Tensor(index_t B, index_t H, index_t L, index_t D, bool seq_major, std::uint32_t seed) {
    data.resize(static_cast<std::size_t>(B * H * L * D));
    std::uint32_t x = seed * 2654435761u + 7;
    for (auto& a : data) {
      x = x * 1664525u + 1013904223u;
      a = static_cast<T>(static_cast<double>(static_cast<int>(x >> 24) - 128) / 64.0);
    }
    view = seq_major ? attn::bshd(data.data(), B, L, H, D) : attn::bhsd(data.data(), B, H, L, D);
  }
};

template <class T, class Mask, class Mod>
void run(const attn::BlockSparseLayout& layout, const Mask& inner, const Mod& mod, index_t B,
         index_t Hq, index_t Hkv, index_t Lq, index_t Lk, index_t D, index_t Dv, Bytes& in,
         bool fits) {
  Tensor<T> q(B, Hq, Lq, D, in.flag(), 1), k(B, Hkv, Lk, D, in.flag(), 2),
      v(B, Hkv, Lk, Dv, in.flag(), 3), out(B, Hq, Lq, Dv, in.flag(), 4);
  std::vector<float> lse(static_cast<std::size_t>(B * Hq * Lq), 7.f);
  attn::AttentionOptions opt;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {B, Hq, Lq});
  opt.num_threads = 1;
  const auto qc = attn::Tensor4<const T>(q.view), kc = attn::Tensor4<const T>(k.view),
             vc = attn::Tensor4<const T>(v.view);
  if (!fits) {
    const std::vector<T> before = out.data;
    try {
      attn::sparse_attention(qc, kc, vc, out.view, layout, inner, mod, opt);
    } catch (const attn::Error&) {
      if (out.data != before ||
          std::any_of(lse.begin(), lse.end(), [](float x) { return x != 7.f; }))
        fail("written before the layout was refused");
      return;
    }
    fail("a layout that does not fit the problem was accepted");
  }
  attn::sparse_attention(qc, kc, vc, out.view, layout, inner, mod, opt);

  std::vector<double> ref_buf(static_cast<std::size_t>(B * Hq * Lq * Dv));
  std::vector<float> ref_lse(lse.size());
  attn::AttentionOptions ref_opt;
  ref_opt.lse = attn::TensorView<float, 3>(ref_lse.data(), {B, Hq, Lq});
  const auto ref = attn::bhsd(ref_buf.data(), B, Hq, Lq, Dv);
  const attn::BlockSparseMask<Mask> policy{{}, &layout, inner};
  attn::reference::attention(qc, kc, vc, ref, policy, mod, ref_opt);
  const double tol = std::is_same<T, float>::value ? 2e-4 : 1e-10;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hq; ++h)
      for (index_t i = 0; i < Lq; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * Hq + h) * Lq + i);
        const bool empty = std::isinf(ref_lse[row]);
        if (empty ? lse[row] != ref_lse[row]
                  : !(std::abs(lse[row] - ref_lse[row]) <= 1e-4 * (1 + std::abs(ref_lse[row]))))
          fail("lse of row " + std::to_string(row) + ": " + std::to_string(lse[row]) + " vs " +
               std::to_string(ref_lse[row]));
        for (index_t c = 0; c < Dv; ++c) {
          const double x = static_cast<double>(out.view(b, h, i, c)), y = ref(b, h, i, c);
          if (empty ? x != 0.0 : !(std::abs(x - y) <= tol * (1 + std::abs(y))))
            fail("output differs: " + std::to_string(x) + " vs " + std::to_string(y));
        }
      }
  // masked_attention with the layout as a policy and other tiles agrees too.
  Tensor<T> again = out;
  again.view = attn::Tensor4<T>(again.data.data(), out.view.shape(), out.view.strides());
  attn::AttentionOptions other;
  other.num_threads = 2;
  attn::sparse_attention(qc, kc, vc, again.view, layout, inner, mod, other);
  if (again.data != out.data) fail("1 and 2 threads differ");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const index_t B = in.range(1, 2), Hkv = in.range(1, 2), Hq = Hkv * in.range(1, 2);
  const index_t Lq = in.range(1, 40), Lk = in.range(1, 40), D = in.range(1, 12),
                Dv = in.range(1, 12);
  const index_t bq = in.range(1, 12), bk = in.range(1, 12);
  index_t qb = (Lq + bq - 1) / bq, kb = (Lk + bk - 1) / bk, heads = in.flag() ? Hq : 1;
  const bool raw = in.range(0, 3) == 0;
  bool fits = true;
  switch (in.range(0, 15)) {  // a grid that does not fit the problem
    case 0:
      qb += 1, fits = false;
      break;
    case 1:
      kb = std::max<index_t>(1, kb - 1), fits = kb == (Lk + bk - 1) / bk;
      break;
    case 2:
      heads = Hq + 1, fits = false;
      break;
    default:
      break;
  }
  std::vector<bool> bits;
  attn::BlockSparseLayout layout;
  if (!decode_layout(in, bq, bk, qb, kb, heads, raw, bits, layout)) {
    if (!raw) fail("a valid layout was refused");
    return 0;
  }
  check_invariants(layout);
  if (!raw) {  // the same bits as a dense block mask give the same layout
    const auto m = attn::BlockSparseLayout::from_block_mask(bq, bk, qb, kb, bits, heads);
    if (m.row_offsets() != layout.row_offsets() || m.cols() != layout.cols())
      fail("from_block_mask differs from the rows");
    // union with a local band: contains() is the OR of both
    const auto band = attn::BlockSparseLayout(
        bq, bk, qb, kb, 1,
        [&] {
          std::vector<index_t> o{0};
          for (index_t i = 0; i < qb; ++i) o.push_back(o.back() + (i < kb ? 1 : 0));
          return o;
        }(),
        [&] {
          std::vector<index_t> c;
          for (index_t i = 0; i < qb && i < kb; ++i) c.push_back(i);
          return c;
        }());
    const auto u = layout | band;
    check_invariants(u);
    for (index_t h = 0; h < u.heads(); ++h)
      for (index_t i = 0; i < qb; ++i)
        for (index_t j = 0; j < kb; ++j)
          if (u.contains(h, i, j) != (layout.contains(h, i, j) || band.contains(h, i, j)))
            fail("union is not the OR of its operands");
  }

  const int inner = static_cast<int>(in.range(0, 2)), mod = static_cast<int>(in.range(0, 2));
  const bool dbl = in.flag();
  std::vector<index_t> lengths;
  for (index_t b = 0; b < B; ++b) lengths.push_back(in.range(0, Lk));
  auto with_mod = [&](const auto& mask) {
    auto go = [&](const auto& m) {
      if (dbl)
        run<double>(layout, mask, m, B, Hq, Hkv, Lq, Lk, D, Dv, in, fits);
      else
        run<float>(layout, mask, m, B, Hq, Hkv, Lq, Lk, D, Dv, in, fits);
    };
    if (mod == 0)
      go(attn::no_score_mod());
    else if (mod == 1)
      go(attn::alibi(attn::alibi_slopes(Hq)));
    else
      go(attn::softcap(3.0));
  };
  if (inner == 0)
    with_mod(attn::no_mask());
  else if (inner == 1)
    with_mod(attn::causal());
  else
    with_mod(attn::key_padding(lengths));
  return 0;
}
