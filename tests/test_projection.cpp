// The layers' projections (attn/layers/projection.hpp) against an fp64 triple
// loop on every instruction set this machine runs: tails of the register
// tile and of the panel, every weight form (in_out, PyTorch out_in, column
// order, gaps, negative and zero strides, a single column with a zero or
// negative row stride), and bitwise equality across forms and 1, 2, 3 threads.
#include "layer_reference.hpp"

#include <attn/layers/projection.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using attn::WeightLayout;
using attn::detail::ProjIsa;

template <class T>
class Projection : public ::testing::Test {};
TYPED_TEST_SUITE(Projection, attn_test::FloatTypes, );

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

std::vector<ProjIsa> isas() {
  std::vector<ProjIsa> r;
  for (ProjIsa i : {ProjIsa::portable, ProjIsa::avx2, ProjIsa::avx512})
    if (attn::detail::projection_isa_supported(i)) r.push_back(i);
  return r;
}

const char* isa_name(ProjIsa i) {
  return i == ProjIsa::avx512 ? "avx512" : i == ProjIsa::avx2 ? "avx2" : "portable";
}

/// y = x·W + b in fp64 through the views' strides.
template <class T>
std::vector<double> reference(const attn::TensorView<const T, 3>& x,
                              const attn::TensorView<const T, 2>& w,
                              const attn::TensorView<const T, 1>& b) {
  const index_t B = x.extent(0), L = x.extent(1), d = w.extent(0), n = w.extent(1);
  std::vector<double> y(static_cast<std::size_t>(B * L * n));
  for (index_t bb = 0; bb < B; ++bb)
    for (index_t l = 0; l < L; ++l)
      for (index_t c = 0; c < n; ++c) {
        double s = b.is_null() ? 0.0 : double(b(c));
        for (index_t p = 0; p < d; ++p) s += double(x(bb, l, p)) * double(w(p, c));
        y[static_cast<std::size_t>((bb * L + l) * n + c)] = s;
      }
  return y;
}

// Every tail: rows around the tile heights (4, 6, 12) and the task block
// (96), columns around the panel width (16, 32), depth 1 and odd.
TYPED_TEST(Projection, MatchesFp64OnEveryInstructionSet) {
  using T = TypeParam;
  for (ProjIsa isa : isas())
    for (index_t rows : {1, 5, 11, 12, 13, 97, 200})
      for (index_t cols : {1, 15, 16, 17, 33, 70})
        for (index_t depth : {1, 19, 64}) {
          const auto xs = random_values<T>(static_cast<std::size_t>(rows * depth), 1);
          const auto ws = random_values<T>(static_cast<std::size_t>(depth * cols), 2);
          const auto bs = random_values<T>(static_cast<std::size_t>(cols), 3);
          const attn::TensorView<const T, 3> x(xs.data(), {1, rows, depth});
          const attn::TensorView<const T, 2> w(ws.data(), {depth, cols});
          const attn::TensorView<const T, 1> b(bs.data(), {cols});
          attn::detail::PackedWeight<T> packed;
          packed.pack(w);
          std::vector<T> y(static_cast<std::size_t>(rows * cols));
          attn::detail::project_packed(x, packed, b,
                                       attn::TensorView<T, 3>(y.data(), {1, rows, cols}), 2, isa);
          const auto ref = reference(x, w, b);
          const double tol = 4.0 * attn_test::eps<T>() * double(depth + 1);
          double err = 0;
          for (std::size_t i = 0; i < y.size(); ++i)
            err = std::max(err, std::abs(double(y[i]) - ref[i]));
          EXPECT_LE(err, tol) << isa_name(isa) << " rows=" << rows << " cols=" << cols
                              << " depth=" << depth;
        }
}

/// The same [in, out] weight stored in many forms; each form is a view of
/// its own buffer.
template <class T>
struct WeightForms {
  std::vector<std::vector<T>> bufs;
  std::vector<attn::TensorView<const T, 2>> views;  // as passed, with `layouts`
  std::vector<WeightLayout> layouts;
  std::vector<std::string> names;

  WeightForms(const std::vector<T>& w, index_t in, index_t out) {
    auto at = [&](index_t p, index_t c) { return w[static_cast<std::size_t>(p * out + c)]; };
    // in_out, row-major
    add(w, attn::TensorView<const T, 2>(nullptr, {in, out}), WeightLayout::in_out, "in_out");
    // PyTorch [out, in], row-major
    std::vector<T> t(static_cast<std::size_t>(in * out));
    for (index_t p = 0; p < in; ++p)
      for (index_t c = 0; c < out; ++c) t[static_cast<std::size_t>(c * in + p)] = at(p, c);
    add(t, attn::TensorView<const T, 2>(nullptr, {out, in}), WeightLayout::out_in, "out_in");
    // the PyTorch buffer viewed in place as [in, out] with strides {1, in}
    add(t, attn::TensorView<const T, 2>(nullptr, {in, out}, {1, in}), WeightLayout::in_out,
        "in_out column order");
    // rows with gaps (row stride out + 3, column stride 2)
    std::vector<T> g(static_cast<std::size_t>(in * (2 * out + 3)), T(-7));
    for (index_t p = 0; p < in; ++p)
      for (index_t c = 0; c < out; ++c)
        g[static_cast<std::size_t>(p * (2 * out + 3) + 2 * c)] = at(p, c);
    add(g, attn::TensorView<const T, 2>(nullptr, {in, out}, {2 * out + 3, 2}), WeightLayout::in_out,
        "in_out with gaps");
    // negative strides: the buffer holds W reversed in both dims
    std::vector<T> r(static_cast<std::size_t>(in * out));
    for (index_t p = 0; p < in; ++p)
      for (index_t c = 0; c < out; ++c)
        r[static_cast<std::size_t>((in - 1 - p) * out + (out - 1 - c))] = at(p, c);
    add(r, attn::TensorView<const T, 2>(nullptr, {in, out}, {-out, -1}), WeightLayout::in_out,
        "in_out negative strides", in * out - 1);
  }
  void add(std::vector<T> buf, attn::TensorView<const T, 2> shape, WeightLayout l, std::string name,
           index_t offset = 0) {
    bufs.push_back(std::move(buf));
    views.emplace_back(bufs.back().data() + offset, shape.shape(), shape.strides());
    layouts.push_back(l);
    names.push_back(std::move(name));
  }
};

// Every weight form gives the bits of the row-major in_out weight, for 1, 2
// and 3 threads, at row counts below, at and above the parallel thresholds.
TYPED_TEST(Projection, EveryWeightFormAndThreadCountGivesTheSameBits) {
  using T = TypeParam;
  const index_t in = 67, out = 90;
  const auto wv = random_values<T>(static_cast<std::size_t>(in * out), 5);
  const auto bv = random_values<T>(static_cast<std::size_t>(out), 6);
  WeightForms<T> forms(wv, in, out);
  for (std::size_t f = 0; f < forms.bufs.size(); ++f) {
    // views point into bufs, which moved into place before views were made
    ASSERT_EQ(forms.views[f].data() == nullptr, false);
  }
  for (index_t rows : {1, 40, 333, 1000}) {
    const auto xs = random_values<T>(static_cast<std::size_t>(rows * in), 7);
    const attn::TensorView<const T, 3> x(xs.data(), {1, rows, in});
    const attn::TensorView<const T, 1> b(bv.data(), {out});
    std::vector<T> first;
    for (std::size_t f = 0; f < forms.views.size(); ++f)
      for (int threads : {1, 2, 3}) {
        std::vector<T> y(static_cast<std::size_t>(rows * out));
        attn::linear<T>(x, forms.views[f], forms.layouts[f], b,
                        attn::TensorView<T, 3>(y.data(), {1, rows, out}), threads);
        if (first.empty()) {
          first = y;
          const auto ref = reference(x, attn::TensorView<const T, 2>(wv.data(), {in, out}), b);
          for (std::size_t i = 0; i < y.size(); ++i)
            ASSERT_NEAR(double(y[i]), ref[i], 4.0 * attn_test::eps<T>() * (in + 1));
        }
        ASSERT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(T)))
            << forms.names[f] << " threads=" << threads << " rows=" << rows;
      }
  }
}

// A single-column weight is a legal view whatever its row stride: zero (every
// row the same element) and negative strides are read as they say.
TYPED_TEST(Projection, SingleColumnWeightWithZeroOrNegativeRowStride) {
  using T = TypeParam;
  const index_t in = 9, rows = 5;
  const auto xs = random_values<T>(static_cast<std::size_t>(rows * in), 8);
  const auto ws = random_values<T>(static_cast<std::size_t>(in), 9);
  const attn::TensorView<const T, 3> x(xs.data(), {1, rows, in});
  for (index_t stride : {0, -1, 1}) {
    const T* base = stride < 0 ? ws.data() + (in - 1) : ws.data();
    const attn::TensorView<const T, 2> w(base, {in, 1}, {stride, 1});
    std::vector<T> y(static_cast<std::size_t>(rows));
    attn::linear<T>(x, w, WeightLayout::in_out, {}, attn::TensorView<T, 3>(y.data(), {1, rows, 1}));
    const auto ref = reference(x, w, attn::TensorView<const T, 1>());
    for (index_t r = 0; r < rows; ++r)
      EXPECT_NEAR(double(y[static_cast<std::size_t>(r)]), ref[static_cast<std::size_t>(r)],
                  4.0 * attn_test::eps<T>() * (in + 1))
          << "row stride " << stride;
  }
}

TEST(ProjectionErrors, ShapesAndOverlapThrowBeforeWriting) {
  std::vector<float> x(2 * 3 * 4, 1.f), w(4 * 5, 1.f), y(2 * 3 * 5, -1.f);
  const attn::TensorView<const float, 3> xv(x.data(), {2, 3, 4});
  const attn::TensorView<float, 3> yv(y.data(), {2, 3, 5});
  const std::vector<float> before = y;
  EXPECT_TRUE(attn_test::throws_with(
      [&] {
        attn::linear<float>(xv, attn::TensorView<const float, 2>(w.data(), {4, 5}),
                            WeightLayout::out_in, {}, yv);
      },
      "WeightLayout::out_in"));
  EXPECT_TRUE(attn_test::throws_with(
      [&] {
        attn::linear<float>(xv, attn::TensorView<const float, 2>(y.data(), {4, 5}),
                            WeightLayout::in_out, {}, yv);
      },
      "y overlaps weight"));
  EXPECT_EQ(before, y);
}

}  // namespace

// The projections follow the library's dispatch: every AVX-512 level
// (including the bf16 and AMX ones, which only change bf16 attention
// products) runs the AVX-512 projection kernels, never the portable loops.
TEST(ProjectionDispatch, FollowsTheActiveInstructionSet) {
  for (attn::Isa isa : attn::supported_isas()) {
    attn::set_isa(isa);
    const ProjIsa want = isa == attn::Isa::portable ? ProjIsa::portable
                         : isa == attn::Isa::avx2   ? ProjIsa::avx2
                                                    : ProjIsa::avx512;
    if (attn::detail::projection_isa_supported(want)) {
      EXPECT_EQ(attn::detail::projection_isa(), want) << attn::isa_name(isa);
    }
  }
  attn::reset_isa();
}
