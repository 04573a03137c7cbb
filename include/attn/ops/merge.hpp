// attn/ops/merge.hpp — combine two attention results over disjoint key sets.
//
// Softmax attention over keys A ∪ B (A, B disjoint) is exactly
//
//   lse = logaddexp(lse_a, lse_b)
//   out = out_a·exp(lse_a - lse) + out_b·exp(lse_b - lse)
//
// which is how split-KV decoding, ring attention and callers that attend to a
// cache and to new tokens separately put their pieces together.
#pragma once

#include "attn/core/types.hpp"
#include "attn/detail/checks.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/engine/partial.hpp"
#include "attn/tensor_view.hpp"

#include <memory>
#include <type_traits>

namespace attn {

/// Merges the result (out_b [B, H, L, Dv], lse_b [B, H, L]) of attention over
/// one key set into the result (out, lse) over a disjoint key set, in place.
/// Both come from attn's entry points with options.lse set (or anything with
/// the same meaning: out normalised, lse the natural log of the softmax
/// denominator, -inf for a row that saw no key). lse and lse_b are float or
/// double each (a double forward's lse keeps double rounding). Arithmetic in
/// float, double if any of the four is double. Rows are independent, so the
/// result does not depend on num_threads (0 = all OpenMP threads).
template <class TA, class LA, class TB, class LB>
void merge_partials(const TensorView<TA, 4>& out, const TensorView<LA, 3>& lse,
                    const TensorView<TB, 4>& out_b, const TensorView<LB, 3>& lse_b,
                    int num_threads = 0) {
  static_assert(!std::is_const<TA>::value && !std::is_const<LA>::value,
                "attn: merge_partials writes `out` and `lse`; they must be writable");
  static_assert(detail::is_storage_type_v<TA> && detail::is_storage_type_v<std::remove_cv_t<TB>>,
                "attn: element types must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert((std::is_same<LA, float>::value || std::is_same<LA, double>::value) &&
                    (std::is_same<std::remove_cv_t<LB>, float>::value ||
                     std::is_same<std::remove_cv_t<LB>, double>::value),
                "attn: lse and lse_b are float or double");
  using detail::fail;
  detail::check_view(out, "out");
  detail::check_view(lse, "lse");
  detail::check_view(out_b, "out_b");
  detail::check_view(lse_b, "lse_b");
  for (int i = 0; i < 4; ++i)
    if (out_b.extent(i) != out.extent(i))
      fail("out_b has shape ", detail::shape_str(out_b), ", but out has shape ",
           detail::shape_str(out));
  for (int i = 0; i < 3; ++i)
    if (lse.extent(i) != out.extent(i) || lse_b.extent(i) != out.extent(i))
      fail("lse has shape ", detail::shape_str(lse), " and lse_b ", detail::shape_str(lse_b),
           ", expected [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2),
           "] (batch, heads, L of out)");
  if (num_threads < 0) fail("num_threads is ", num_threads, ", must be >= 0");
  detail::check_not_self_overlapping(out, "out");
  detail::check_not_self_overlapping(lse, "lse");
  detail::check_no_overlap(out, "out", lse, "lse");
  detail::check_no_overlap(out, "out", out_b, "out_b");
  detail::check_no_overlap(out, "out", lse_b, "lse_b");
  detail::check_no_overlap(lse, "lse", out_b, "out_b");
  detail::check_no_overlap(lse, "lse", lse_b, "lse_b");

  using Acc = detail::accum_t<TA, TB, LA, LB>;
  const index_t B = out.extent(0), H = out.extent(1), L = out.extent(2), Dv = out.extent(3);
  const index_t tasks = B * H;
  struct None {};
  detail::parallel_tasks(
      tasks, detail::resolve_threads(num_threads, tasks), [] { return std::make_unique<None>(); },
      [&](None&, index_t t) {
        const index_t b = t / H, h = t % H;
        for (index_t i = 0; i < L; ++i)
          detail::merge_row<Acc>(&out(b, h, i, 0), out.stride(3), lse(b, h, i), &out_b(b, h, i, 0),
                                 out_b.stride(3), lse_b(b, h, i), Dv);
      },
      [](const None&) {});
}

}  // namespace attn
