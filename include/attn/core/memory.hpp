// attn/core/memory.hpp — large buffers on transparent huge pages.
//
// A buffer of 4 MiB or more is aligned to 2 MiB and, on Linux, advised for
// transparent huge pages (MADV_HUGEPAGE: a hint, honoured where the kernel's
// THP mode is `always` or `madvise`). Two costs go away with 4 KiB pages:
// the first touch of each page (about 10 µs: 8192 faults for 32 MiB), and the
// page walk of every 4 KiB a stream crosses, which a decoding step over a long
// cache pays on every page it reads (a paged cache's blocks, 8 KiB per head
// with the next head's 56 KiB between them, need a new page-table line for
// almost every run).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attn {
namespace detail {

/// Buffers from this many bytes on are aligned to huge pages and advised for them.
constexpr std::size_t huge_page_min_bytes = std::size_t{4} << 20;
constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

/// `bytes` of uninitialised memory, 64-byte aligned (2 MiB and advised for huge
/// pages from huge_page_min_bytes on); free with std::free. Throws
/// std::bad_alloc.
inline void* allocate_large(std::size_t bytes) {
  const std::size_t align = bytes >= huge_page_min_bytes ? huge_page_bytes : 64;
  const std::size_t size = (bytes + align - 1) / align * align;  // aligned_alloc: a multiple
  void* p = std::aligned_alloc(align, size == 0 ? align : size);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == huge_page_bytes) madvise(p, size, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
  return p;
}

/// A std::vector allocator that takes its memory from allocate_large: the
/// storage of the KV caches, which decoding streams through once per step.
template <class T>
struct LargeAllocator {
  using value_type = T;
  LargeAllocator() = default;
  template <class U>
  LargeAllocator(const LargeAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(allocate_large(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const LargeAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const LargeAllocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace detail
}  // namespace attn
