// attn/detail/parallel.hpp — run independent tasks over worker threads.
#pragma once

#include "attn/tensor_view.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attn {
namespace detail {

/// Threads to use for `tasks` tasks when the caller asked for `requested`
/// (0 = all that OpenMP offers; always 1 without OpenMP).
inline int resolve_threads(int requested, index_t tasks) {
#ifdef _OPENMP
  const int avail = requested > 0 ? requested : omp_get_max_threads();
#else
  const int avail = 1;
  (void)requested;
#endif
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(avail, tasks)));
}

/// Runs body(scratch, t) for t in [0, tasks), tasks handed out dynamically in
/// index order (put the heaviest first). Each worker gets its own scratch,
/// made by make_scratch() before any worker starts, so allocation failures
/// surface here as exceptions and nothing is allocated inside the loop.
/// A task's result must depend only on t, never on which worker ran it.
/// After the loop, finish(scratch) runs once per worker, serially, in worker
/// order (to merge per-worker counters).
///
/// An exception thrown by a task (a user's mask, score modifier or feature
/// map) never leaves a worker thread, which would end the program: each
/// worker catches it, the remaining tasks are skipped, and after the region
/// the exception of the lowest-numbered failing task is rethrown to the
/// caller, as with one thread. The outputs may then be partly written (the
/// tasks that ran wrote theirs); finish() does not run.
template <class MakeScratch, class Body, class Finish>
void parallel_tasks(index_t tasks, int threads, MakeScratch make_scratch, Body body,
                    Finish finish) {
  std::vector<decltype(make_scratch())> scratch;
  scratch.reserve(static_cast<std::size_t>(threads));
  for (int i = 0; i < threads; ++i) scratch.push_back(make_scratch());
#ifdef _OPENMP
  if (threads > 1) {
    // One slot per worker: its first failure and that task's index.
    std::vector<std::exception_ptr> error(static_cast<std::size_t>(threads));
    std::vector<index_t> failed_task(static_cast<std::size_t>(threads), tasks);
    std::atomic<bool> stop{false};  // a flag to skip work, not a reduction
#pragma omp parallel num_threads(threads)
    {
      const auto w = static_cast<std::size_t>(omp_get_thread_num());
      auto& mine = *scratch[w];
#pragma omp for schedule(dynamic, 1)
      for (index_t t = 0; t < tasks; ++t) {
        if (stop.load(std::memory_order_relaxed)) continue;
        try {
          body(mine, t);
        } catch (...) {
          if (!error[w]) {
            error[w] = std::current_exception();
            failed_task[w] = t;
          }
          stop.store(true, std::memory_order_relaxed);
        }
      }
    }
    std::size_t first = 0;
    for (std::size_t w = 1; w < failed_task.size(); ++w)
      if (failed_task[w] < failed_task[first]) first = w;
    if (error[first]) std::rethrow_exception(error[first]);
    for (auto& s : scratch) finish(*s);
    return;
  }
#endif
  for (index_t t = 0; t < tasks; ++t) body(*scratch[0], t);
  finish(*scratch[0]);
}

}  // namespace detail
}  // namespace attn
