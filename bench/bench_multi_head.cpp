// Benchmark of the attention layer (attn::MultiHeadAttention) against the
// same layer written naively in Eigen, with the layer's time split into its
// projections and its attention, and the attention held against the
// foundation's scaled_dot_product_attention on the same shapes.
//
//   bench_multi_head           d_model 512 (8×64) at N 512, 2048; d_model 2048 at N 512
//   bench_multi_head --sweep   adds d_model 512 at N = 256 ... 65536 and d_model 2048
//                              (16×128, kv 16 and 4) at N 2048; rows past the limits
//                              of bench_support.hpp (N² scores over 4 GiB, calls over
//                              2 TFLOP) are skipped with a note. --full: the same.
//
// Rows are named path/N:<len>/d_model:<d>/H:<q heads>/Hkv:<kv heads>. Counters:
// GFLOPs (GFLOP/s), roofline_frac against the row roofline/gemm, and x_baseline:
// layer against naive_eigen, layer_projections against eigen_projections,
// layer_attention_bshd against sdpa_bhsd (same shape). layer_backward (the
// layer's backward after a training forward, dense) has x_forward = its time /
// the layer's forward time, and GFLOPs counting 2× the projections' FLOPs (dx
// and the weight gradients) and 2.5× the attention's.
//
// The projections run attn's own kernels, picked at run time (AVX-512F, AVX2,
// portable), so a build without -march runs them at the speed of a native
// build: configure with -DATTN_NATIVE=OFF to compare (docs/multi_head.md).
//
// Pass Google Benchmark flags as usual, e.g.
//   --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include "bench_support.hpp"

#include <attn/attn.hpp>
#include <attn/multi_head.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using attn::index_t;
using Mat = attn::RowMatrix<float>;

/// One layer shape: B = 1.
struct Shape {
  index_t d_model, q_heads, kv_heads, len;
  index_t head_dim() const { return d_model / q_heads; }
  /// "N:2048/d_model:512/H:8/Hkv:8": the length first, as the plots read it.
  std::string name() const {
    return "N:" + std::to_string(len) + "/d_model:" + std::to_string(d_model) +
           "/H:" + std::to_string(q_heads) + "/Hkv:" + std::to_string(kv_heads);
  }
  /// 2·rows·in·out of the four projections.
  double projection_flops() const {
    const double L = double(len), d = double(d_model), D = double(head_dim());
    return 2.0 * L * d * D * double(2 * q_heads + 2 * kv_heads);
  }
  /// 4·L²·D·Hq of dense attention (QKᵀ and PV).
  double attention_flops() const {
    return 4.0 * double(len) * double(len) * double(head_dim()) * double(q_heads);
  }
};

Mat random(index_t r, index_t c, unsigned seed, float stddev) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, stddev);
  Mat m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

/// Weights and input of one shape, shared by every path.
struct Setup {
  Shape s;
  Mat x, wq, wk, wv, wo;
  explicit Setup(const Shape& shape) : s(shape) {
    const index_t D = s.head_dim();
    const float sd = 1.f / std::sqrt(float(s.d_model));
    x = random(s.len, s.d_model, 1, 1.f);
    wq = random(s.d_model, s.q_heads * D, 2, sd);
    wk = random(s.d_model, s.kv_heads * D, 3, sd);
    wv = random(s.d_model, s.kv_heads * D, 4, sd);
    wo = random(s.q_heads * D, s.d_model, 5, sd);
  }
  attn::MultiHeadConfig config() const {
    attn::MultiHeadConfig c;
    c.d_model = s.d_model;
    c.q_heads = s.q_heads;
    c.kv_heads = s.kv_heads;
    return c;
  }
  attn::TensorView<const float, 3> xview() const {
    return attn::TensorView<const float, 3>(x.data(), {1, s.len, s.d_model});
  }
};

/// Skips a row whose naive N×N score buffer or work per call pass the limits.
bool skip_over_limits(benchmark::State& state, const Shape& s, const char* path, bool scores) {
  const double bytes = scores ? double(s.len) * double(s.len) * sizeof(float) : 0.0;
  return attn_bench::skip_over_limits(state, path, bytes,
                                      s.projection_flops() + s.attention_flops());
}

// ------------------------------------------------------------------- paths --

/// The whole layer: projections, attention, output projection.
void layer(benchmark::State& state, Shape shape) {
  if (skip_over_limits(state, shape, "layer", false)) return;
  const Setup su(shape);
  attn::MultiHeadAttention<float> mha(su.config());
  mha.set_wq(su.wq);
  mha.set_wk(su.wk);
  mha.set_wv(su.wv);
  mha.set_wo(su.wo);
  Mat out(shape.len, shape.d_model);
  const attn::TensorView<float, 3> ov(out.data(), {1, shape.len, shape.d_model});
  mha.forward(su.xview(), ov);  // sizes the scratch once
  const double t = attn_bench::timed_loop(state, [&] {
    mha.forward(su.xview(), ov);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::set_gflops(state, shape.projection_flops() + shape.attention_flops(), t);
  attn_bench::set_ratio(state, "layer/" + shape.name(), t);
  attn_bench::record_time(state, "layer_forward/" + shape.name(), t);
}

/// The layer's backward: dx and every weight gradient from a training forward's context.
void layer_backward(benchmark::State& state, Shape shape) {
  if (skip_over_limits(state, shape, "layer_backward", false)) return;
  const Setup su(shape);
  attn::MultiHeadAttention<float> mha(su.config());
  mha.set_wq(su.wq);
  mha.set_wk(su.wk);
  mha.set_wv(su.wv);
  mha.set_wo(su.wo);
  const index_t L = shape.len, d = shape.d_model;
  Mat out(L, d), dx(L, d);
  const Mat dout = random(L, d, 11, 1.f);
  const attn::TensorView<float, 3> ov(out.data(), {1, L, d}), dxv(dx.data(), {1, L, d});
  const attn::TensorView<const float, 3> dov(dout.data(), {1, L, d});
  attn::AttentionContext<float> ctx;
  attn::AttentionGrads<float> grads;
  mha.forward(su.xview(), ov, attn::no_mask(), attn::no_score_mod(), {}, ctx);
  mha.backward(ctx, su.xview(), dov, dxv, grads);  // sizes the scratch once
  const double t = attn_bench::timed_loop(state, [&] {
    mha.backward(ctx, su.xview(), dov, dxv, grads);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  });
  attn_bench::set_gflops(state, 2.0 * shape.projection_flops() + 2.5 * shape.attention_flops(), t);
  const double fwd = attn_bench::baseline_seconds("layer_forward/" + shape.name());
  if (fwd > 0 && t > 0) state.counters["x_forward"] = t / fwd;
}

/// The four projections as Eigen products (what the layer ran before its own
/// kernel; Eigen compiled for this binary's flags, threaded by Eigen): the
/// baseline of layer_projections.
void eigen_projections(benchmark::State& state, Shape shape) {
  const Setup su(shape);
  const index_t D = shape.head_dim();
  Mat q(shape.len, shape.q_heads * D), k(shape.len, shape.kv_heads * D),
      v(shape.len, shape.kv_heads * D), heads = random(shape.len, shape.q_heads * D, 6, 1.f),
                                        out(shape.len, shape.d_model);
  const double t = attn_bench::timed_loop(state, [&] {
    q.noalias() = su.x * su.wq;
    k.noalias() = su.x * su.wk;
    v.noalias() = su.x * su.wv;
    out.noalias() = heads * su.wo;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::record_time(state, "projections/" + shape.name(), t);
  attn_bench::set_gflops(state, shape.projection_flops(), t);
}

/// The layer's four projections alone (the same packed kernel forward runs,
/// weights packed once as a layer does).
void layer_projections(benchmark::State& state, Shape shape) {
  const Setup su(shape);
  attn::MultiHeadAttention<float> mha(su.config());
  mha.set_wq(su.wq);
  mha.set_wk(su.wk);
  mha.set_wv(su.wv);
  mha.set_wo(su.wo);
  const attn::MultiHeadWeights<float> w = mha.weights();
  attn::detail::PackedProjections<float> p;
  p.pack({w.wq, w.wk, w.wv, w.wo, w.bq, w.bk, w.bv, w.bo});
  const index_t D = shape.head_dim(), L = shape.len;
  Mat q(L, shape.q_heads * D), k(L, shape.kv_heads * D), v(L, shape.kv_heads * D),
      heads = random(L, shape.q_heads * D, 6, 1.f), out(L, shape.d_model);
  auto view = [&](Mat& m) { return attn::TensorView<float, 3>(m.data(), {1, L, m.cols()}); };
  const attn::TensorView<const float, 3> hv(heads.data(), {1, L, heads.cols()});
  const double t = attn_bench::timed_loop(state, [&] {
    attn::detail::project_packed(su.xview(), p.q, p.bq, view(q), 0);
    attn::detail::project_packed(su.xview(), p.k, p.bk, view(k), 0);
    attn::detail::project_packed(su.xview(), p.v, p.bv, view(v), 0);
    attn::detail::project_packed(hv, p.o, p.bo, view(out), 0);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::set_gflops(state, shape.projection_flops(), t);
  attn_bench::set_ratio(state, "projections/" + shape.name(), t);
}

/// The layer's attention alone: bshd views of the projection buffers.
void layer_attention(benchmark::State& state, Shape shape) {
  if (skip_over_limits(state, shape, "layer_attention_bshd", false)) return;
  const index_t D = shape.head_dim(), L = shape.len;
  const Mat q = random(L, shape.q_heads * D, 7, 1.f), k = random(L, shape.kv_heads * D, 8, 1.f),
            v = random(L, shape.kv_heads * D, 9, 1.f);
  Mat a(L, shape.q_heads * D);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  const double t = attn_bench::timed_loop(state, [&] {
    attn::scaled_dot_product_attention(attn::bshd(q.data(), 1, L, shape.q_heads, D),
                                       attn::bshd(k.data(), 1, L, shape.kv_heads, D),
                                       attn::bshd(v.data(), 1, L, shape.kv_heads, D),
                                       attn::bshd(a.data(), 1, L, shape.q_heads, D), opt);
    benchmark::DoNotOptimize(a.data());
  });
  attn_bench::set_gflops(state, stats.flops(D, D), t);
  attn_bench::set_ratio(state, "attention/" + shape.name(), t);
}

/// The foundation's SDPA on contiguous bhsd tensors of the same shape.
void sdpa_bhsd(benchmark::State& state, Shape shape) {
  if (skip_over_limits(state, shape, "sdpa_bhsd", false)) return;
  const index_t D = shape.head_dim(), L = shape.len;
  const Mat q = random(shape.q_heads * L, D, 7, 1.f), k = random(shape.kv_heads * L, D, 8, 1.f),
            v = random(shape.kv_heads * L, D, 9, 1.f);
  Mat a(shape.q_heads * L, D);
  attn::AttentionStats stats;
  attn::AttentionOptions opt;
  opt.stats = &stats;
  const double t = attn_bench::timed_loop(state, [&] {
    attn::scaled_dot_product_attention(attn::bhsd(q.data(), 1, shape.q_heads, L, D),
                                       attn::bhsd(k.data(), 1, shape.kv_heads, L, D),
                                       attn::bhsd(v.data(), 1, shape.kv_heads, L, D),
                                       attn::bhsd(a.data(), 1, shape.q_heads, L, D), opt);
    benchmark::DoNotOptimize(a.data());
  });
  attn_bench::record_time(state, "attention/" + shape.name(), t);
  attn_bench::set_gflops(state, stats.flops(D, D), t);
}

/// The same layer written naively in Eigen: projections, then per head the
/// full [L, L] score matrix, a row softmax, the product with V into the
/// head's columns, then the output projection. Buffers are allocated once
/// outside the loop (a fair naive baseline, not a careless one).
void naive_eigen(benchmark::State& state, Shape shape) {
  if (skip_over_limits(state, shape, "naive_eigen", true)) return;
  const Setup su(shape);
  const index_t D = shape.head_dim(), L = shape.len, group = shape.q_heads / shape.kv_heads;
  const float scale = 1.f / std::sqrt(float(D));
  Mat q(L, shape.q_heads * D), k(L, shape.kv_heads * D), v(L, shape.kv_heads * D),
      a(L, shape.q_heads * D), s(L, L), out(L, shape.d_model);
  const double t = attn_bench::timed_loop(state, [&] {
    q.noalias() = su.x * su.wq;
    k.noalias() = su.x * su.wk;
    v.noalias() = su.x * su.wv;
    for (index_t h = 0; h < shape.q_heads; ++h) {
      const index_t g = h / group;
      s.noalias() =
          (q.middleCols(h * D, D) * scale) * k.middleCols(g * D, D).transpose();  // (L, L)
      s = (s.colwise() - s.rowwise().maxCoeff()).array().exp().matrix();          // exp(s - rowmax)
      s.array().colwise() /= s.rowwise().sum().array();                           // rows sum to 1
      a.middleCols(h * D, D).noalias() = s * v.middleCols(g * D, D);              // (L, D)
    }
    out.noalias() = a * su.wo;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
  attn_bench::record_time(state, "layer/" + shape.name(), t);
  attn_bench::set_gflops(state, shape.projection_flops() + shape.attention_flops(), t);
}

/// The seven rows of one shape, each baseline before the row that reads its time.
void register_shape(const Shape& s) {
  const std::string n = s.name();
  for (auto* b :
       {benchmark::RegisterBenchmark(("naive_eigen/" + n).c_str(), naive_eigen, s),
        benchmark::RegisterBenchmark(("sdpa_bhsd/" + n).c_str(), sdpa_bhsd, s),
        benchmark::RegisterBenchmark(("layer/" + n).c_str(), layer, s),
        benchmark::RegisterBenchmark(("layer_backward/" + n).c_str(), layer_backward, s),
        benchmark::RegisterBenchmark(("eigen_projections/" + n).c_str(), eigen_projections, s),
        benchmark::RegisterBenchmark(("layer_projections/" + n).c_str(), layer_projections, s),
        benchmark::RegisterBenchmark(("layer_attention_bshd/" + n).c_str(), layer_attention, s)})
    b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = attn_bench::take_flag(argc, argv, "--full");
  const bool sweep = attn_bench::take_flag(argc, argv, "--sweep") || full;
  attn_bench::register_roofline_row();
  for (index_t len : attn_bench::lengths(sweep, {512, 2048})) register_shape({512, 8, 8, len});
  register_shape({2048, 16, 16, 512});
  register_shape({2048, 16, 4, 512});
  if (sweep) {
    register_shape({2048, 16, 16, 2048});
    register_shape({2048, 16, 4, 2048});
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
