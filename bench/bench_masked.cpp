// bench_masked — masked attention with score modifiers: the flash engine
// (attn::masked_attention) against a naive Eigen attention that materialises
// the N×N scores of each head, in one binary. B = 1, H = 8, D = 64, float.
//
//   variant         mask                               score modifier
//   causal_padding  causal() & key_padding({3N/4})     none
//   documents       bool_mask [1, 1, N, N]: packed      none
//                   documents of 128 ... 1024 tokens
//                   (block diagonal)
//   alibi           causal()                           alibi(alibi_slopes(8))
//   softcap         none                               softcap(30)
//   bias            none                               additive_bias [1, 1, N, N]
//   alibi_softcap   causal()                           compose(alibi, softcap(30))
//
//   masked_naive    per head: S = scale·Q·Kᵀ (N×N), the same modifier and mask
//                   written in Eigen, row softmax, O = S·V; heads over threads,
//                   one reused S per thread
//   masked_flash    attn::masked_attention: tiles the mask rules out are skipped
//
//   bench_masked              N = 1024 and 4096 (a short run)
//   bench_masked --sweep      N = 256 ... 65536; rows past the limits of
//                             bench_support.hpp (N² buffers over 4 GiB, calls over
//                             2 TFLOP) are skipped with a note
//
// Counters: GFLOPs (GFLOP/s) over the computed work only: AttentionStats (computed
// tiles) for flash, the two full N×N GEMMs for naive; roofline_frac against the
// row roofline/gemm; x_baseline on flash rows = naive time / flash time.
#include "bench_support.hpp"

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace attn_bench;
using attn::index_t;
using Mat = attn::RowMatrix<float>;

constexpr index_t kHeads = 8, kDim = 64;
constexpr double kCap = 30;  // softcap: score = 30·tanh(score / 30)
constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Variant { causal_padding, documents, alibi, softcap, bias, alibi_softcap };
constexpr Variant kVariants[] = {Variant::causal_padding, Variant::documents,
                                 Variant::alibi,          Variant::softcap,
                                 Variant::bias,           Variant::alibi_softcap};

const char* name(Variant v) {
  switch (v) {
    case Variant::causal_padding:
      return "causal_padding";
    case Variant::documents:
      return "documents";
    case Variant::alibi:
      return "alibi";
    case Variant::softcap:
      return "softcap";
    case Variant::bias:
      return "bias";
    case Variant::alibi_softcap:
      return "alibi_softcap";
  }
  return "";
}

bool causal(Variant v) {
  return v == Variant::causal_padding || v == Variant::alibi || v == Variant::alibi_softcap;
}

/// Bytes of the N×N inputs a variant needs besides q, k, v (mask or bias).
double input_bytes(Variant v, index_t n) {
  const double nn = static_cast<double>(n) * static_cast<double>(n);
  return v == Variant::documents ? nn * sizeof(bool) : v == Variant::bias ? nn * sizeof(float) : 0;
}

/// Ratio key of one shape: "alibi/N:1024".
std::string key(Variant v, index_t n) { return std::string(name(v)) + "/N:" + std::to_string(n); }

/// Two full N×N GEMMs per head: 4·H·N²·D.
double dense_flops(index_t n) {
  return 4.0 * kHeads * static_cast<double>(n) * static_cast<double>(n) * kDim;
}

// ----------------------------------------------------------------- problem --

/// q, k, v, out [1, H, N, D] and the variant's N×N mask or bias.
struct Problem {
  Variant variant;
  index_t n;
  std::vector<float> q, k, v, out, bias;  // bias: [1, 1, N, N], bias variant only
  std::unique_ptr<bool[]> keep;           // [1, 1, N, N], documents variant only
  index_t valid_keys;                     // key_padding length: 3N/4
  std::vector<double> slopes = attn::alibi_slopes(kHeads);

  Problem(Variant var, index_t n_)
      : variant(var), n(n_), q(random_buffer(static_cast<std::size_t>(kHeads * n * kDim), 1)),
        k(random_buffer(q.size(), 2)), v(random_buffer(q.size(), 3)), out(q.size()),
        valid_keys(3 * n_ / 4) {
    const std::size_t nn = static_cast<std::size_t>(n) * static_cast<std::size_t>(n);
    if (variant == Variant::bias) bias = random_buffer(nn, 4);
    if (variant == Variant::documents) {
      // Document of each token: lengths drawn from [128, 1024].
      std::vector<index_t> doc(static_cast<std::size_t>(n));
      std::mt19937 gen(5);
      std::uniform_int_distribution<index_t> len(128, 1024);
      for (index_t i = 0, id = 0; i < n; ++id)
        for (index_t end = std::min(n, i + len(gen)); i < end; ++i) doc[i] = id;
      keep.reset(new bool[nn]);
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < n; ++j) keep[i * n + j] = doc[i] == doc[j];  // same document
    }
  }
  attn::Tensor4<const float> in(const std::vector<float>& t) const {
    return attn::bhsd(t.data(), 1, kHeads, n, kDim);
  }
};

// ------------------------------------------------------------------- flash --

template <class Mask, class Mod>
void flash(Problem& p, const Mask& mask, const Mod& mod, attn::AttentionStats& stats) {
  attn::AttentionOptions opt;
  opt.stats = &stats;
  attn::masked_attention(p.in(p.q), p.in(p.k), p.in(p.v),
                         attn::bhsd(p.out.data(), 1, kHeads, p.n, kDim), mask, mod, opt);
}

/// One masked_attention call of the variant; fills `stats`.
void run_flash(Problem& p, attn::AttentionStats& stats) {
  const index_t n = p.n;
  switch (p.variant) {
    case Variant::causal_padding:
      flash(p, attn::causal() & attn::key_padding({p.valid_keys}), attn::no_score_mod(), stats);
      break;
    case Variant::documents:
      flash(p, attn::bool_mask(attn::TensorView<const bool, 4>(p.keep.get(), {1, 1, n, n})),
            attn::no_score_mod(), stats);
      break;
    case Variant::alibi:
      flash(p, attn::causal(), attn::alibi(p.slopes), stats);
      break;
    case Variant::softcap:
      flash(p, attn::no_mask(), attn::softcap(kCap), stats);
      break;
    case Variant::bias:
      flash(p, attn::no_mask(),
            attn::additive_bias(attn::TensorView<const float, 4>(p.bias.data(), {1, 1, n, n})),
            stats);
      break;
    case Variant::alibi_softcap:
      flash(p, attn::causal(), attn::compose(attn::alibi(p.slopes), attn::softcap(kCap)), stats);
      break;
  }
}

void BM_flash(benchmark::State& state, Variant variant) {
  const index_t n = state.range(0);
  const double estimate = dense_flops(n) * (causal(variant) ? 0.5 : 1.0);
  if (skip_over_limits(state, std::string("flash ") + name(variant), input_bytes(variant, n),
                       estimate))
    return;
  Problem p(variant, n);
  attn::AttentionStats stats;
  const double t = timed_loop(state, [&] {
    run_flash(p, stats);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  set_gflops(state, stats.flops(kDim, kDim), t);
  set_ratio(state, key(variant, n), t);
  state.counters["tiles"] = static_cast<double>(stats.full_tiles + stats.partial_tiles);
}

// ------------------------------------------------------------------- naive --

/// s = modifier(s), then masked entries = -inf, for head h of the variant.
void modify_and_mask(const Problem& p, index_t h, Mat& s) {
  const index_t n = p.n;
  const float slope = static_cast<float>(p.slopes[static_cast<std::size_t>(h)]);
  const Eigen::Array<float, 1, Eigen::Dynamic> cols =
      Eigen::Array<float, 1, Eigen::Dynamic>::LinSpaced(n, 0.f, static_cast<float>(n - 1));
  const auto add_alibi = [&] {
    for (index_t i = 0; i < n; ++i)
      s.row(i).array() -= slope * (cols - static_cast<float>(i)).abs();  // -slope·|i - j|
  };
  const auto cap = [&] {
    const float c = static_cast<float>(kCap);
    s = (c * (s.array() / c).tanh()).matrix();  // c·tanh(s / c)
  };
  const auto mask_future = [&] { s.triangularView<Eigen::StrictlyUpper>().setConstant(-kInf); };
  switch (p.variant) {
    case Variant::causal_padding:
      mask_future();
      s.rightCols(n - p.valid_keys).setConstant(-kInf);  // keys j >= 3N/4
      break;
    case Variant::documents: {
      const Eigen::Map<const Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
          keep(p.keep.get(), n, n);
      s = keep.select(s.array(), -kInf).matrix();
      break;
    }
    case Variant::alibi:
      add_alibi();
      mask_future();
      break;
    case Variant::softcap:
      cap();
      break;
    case Variant::bias:
      s += Eigen::Map<const Mat>(p.bias.data(), n, n);
      break;
    case Variant::alibi_softcap:
      add_alibi();
      cap();
      mask_future();
      break;
  }
}

/// The same attention with every score materialised.
void run_naive(Problem& p) {
  const index_t n = p.n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
#pragma omp parallel
  {
    Mat s(n, n);
#pragma omp for schedule(dynamic, 1)
    for (index_t h = 0; h < kHeads; ++h) {
      const Eigen::Map<const Mat> q(p.q.data() + h * n * kDim, n, kDim),
          k(p.k.data() + h * n * kDim, n, kDim), v(p.v.data() + h * n * kDim, n, kDim);
      Eigen::Map<Mat> o(p.out.data() + h * n * kDim, n, kDim);
      s.noalias() = (q * scale) * k.transpose();  // (N, N)
      modify_and_mask(p, h, s);
      for (index_t i = 0; i < n; ++i) {  // row softmax; a row with no key is zeros
        auto row = s.row(i).array();
        const float m = row.maxCoeff();
        if (m == -kInf) {
          row.setZero();
          continue;
        }
        row = (row - m).exp();
        row /= row.sum();
      }
      o.noalias() = s * v;  // (N, D)
    }
  }
}

void BM_naive(benchmark::State& state, Variant variant) {
  const index_t n = state.range(0);
  const double scores = static_cast<double>(n) * static_cast<double>(n) * sizeof(float);
  if (skip_over_limits(state, std::string("naive ") + name(variant),
                       scores * max_threads() + input_bytes(variant, n), dense_flops(n)))
    return;
  Problem p(variant, n);
  const double t = timed_loop(state, [&] {
    run_naive(p);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  });
  record_time(state, key(variant, n), t);
  set_gflops(state, dense_flops(n), t);
}

void register_all(bool sweep) {
  register_roofline_row();
  const std::vector<index_t> ns = lengths(sweep, {1024, 4096});
  // Baselines first: the flash rows read their times.
  for (const bool naive : {true, false})
    for (Variant v : kVariants) {
      auto* b = benchmark::RegisterBenchmark(
          ((naive ? "masked_naive/" : "masked_flash/") + std::string(name(v))).c_str(),
          [v, naive](benchmark::State& s) { naive ? BM_naive(s, v) : BM_flash(s, v); });
      for (index_t n : ns) b->Arg(n);
      b->ArgName("N")->Unit(benchmark::kMillisecond)->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  register_all(take_flag(argc, argv, "--sweep"));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
