// attn/kernels/dispatch.hpp — the one place that picks an instruction set.
//
// The CPU is asked once per process (CPUID, and XGETBV for the operating
// system's register state) which of attn's kernel sets it can run; the
// fastest one (best_isa()) is used unless
//   - the environment variable ATTN_ISA=amx_bf16|avx512_bf16|avx512|avx2|portable
//     names another (read once, at the first call that needs kernels), or
//   - attn::set_isa(isa) was called (it wins over ATTN_ISA; reset_isa() undoes it).
// A set the CPU cannot run, or that this compiler could not build, is refused
// with attn::Error naming it and the sets that are available.
#pragma once

#include "attn/kernels/kernel_set.hpp"
#include "attn/kernels/targets.hpp"
#include "attn/options.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if ATTN_KERNELS_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace attn {
namespace detail {

/// Linux gives a process the (8 KiB) AMX tile state only after it asks, once,
/// with arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); without it the
/// first tile instruction faults. Other systems: AMX is not used.
inline bool request_amx() {
#if ATTN_KERNELS_X86 && defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
  return syscall(SYS_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0;
#else
  return false;
#endif
}

/// Bit i set: the CPU (and OS) can run Isa(i) and this build has its kernels.
inline unsigned detect_isas() {
  unsigned found = 1u << static_cast<int>(Isa::portable);
#if ATTN_KERNELS_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return found;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return found;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_ymm = (xcr0_lo & 0x6u) == 0x6u;    // SSE and AVX state
  const bool os_zmm = (xcr0_lo & 0xE6u) == 0xE6u;  // plus opmask and both halves of zmm
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return found;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16 and AMX-TILE
  const bool os_amx = (xcr0_lo & 0x60000u) == 0x60000u;   // tile config and tile data
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  const bool bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
  if (os_ymm && avx2 && fma && f16c) {
    found |= 1u << static_cast<int>(Isa::avx2);
    if (os_zmm && avx512f && avx512dq && avx512bw && avx512vl) {
      found |= 1u << static_cast<int>(Isa::avx512);
      if (bf16) {
        found |= 1u << static_cast<int>(Isa::avx512_bf16);
        if (amx && os_amx && request_amx()) found |= 1u << static_cast<int>(Isa::amx_bf16);
      }
    }
  }
#endif
  return found;
}

inline unsigned available_isas() {
  static const unsigned isas = detect_isas();
  return isas;
}

/// Whether vdpbf16ps outruns fp32 FMAs here. On AMD (Zen 4 and 5) it doubles
/// the FLOP rate; on the Intel Xeons measured (Sapphire/Emerald Rapids) it
/// issues at half the rate of fp32 FMAs (bf16 dot peak 0.5× the fp32 peak in
/// the same run), so bf16 storage is faster through fp32 products there.
inline bool bf16_products_pay() {
#if ATTN_KERNELS_X86
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746E65u && c == 0x444D4163u;  // "AuthenticAMD"
  }();
  return amd;
#else
  return false;
#endif
}

/// "avx2, portable": the sets this CPU runs, fastest first.
inline std::string available_isa_list() {
  std::string s;
  for (int i = isa_count - 1; i >= 0; --i)
    if (available_isas() & (1u << i)) {
      if (!s.empty()) s += ", ";
      s += isa_name(static_cast<Isa>(i));
    }
  return s;
}

[[noreturn]] inline void fail_isa(const char* source, const std::string& name) {
  fail(source, " asks for instruction set '", name,
       "', which this CPU or build cannot run (it runs ", available_isa_list(), ")");
}

/// ATTN_ISA as read once: -1 when unset or empty, -2 when it names nothing attn
/// knows or a set the CPU cannot run (the text is kept for the error).
struct EnvIsa {
  int isa = -1;
  std::string text;
};
inline const EnvIsa& env_isa() {
  static const EnvIsa env = [] {
    EnvIsa e;
    const char* v = std::getenv("ATTN_ISA");
    if (!v || !*v) return e;
    e.text = v;
    e.isa = -2;
    for (int i = 0; i < isa_count; ++i)
      if (e.text == isa_name(static_cast<Isa>(i)) && (available_isas() & (1u << i))) e.isa = i;
    return e;
  }();
  return env;
}

inline std::atomic<int>& isa_override() {
  static std::atomic<int> isa{-1};
  return isa;
}

}  // namespace detail

/// Whether this CPU can run `isa` and this build holds its kernels.
inline bool isa_supported(Isa isa) {
  return (detail::available_isas() >> static_cast<int>(isa)) & 1u;
}

/// Every instruction set isa_supported() accepts, slowest first.
inline std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (int i = 0; i < isa_count; ++i)
    if (isa_supported(static_cast<Isa>(i))) v.push_back(static_cast<Isa>(i));
  return v;
}

/// The instruction set used by default: the widest this CPU runs, except that
/// avx512_bf16 is chosen only where bf16 products are faster than fp32 ones
/// (AMD; on Intel Xeons avx512 is the default and ATTN_ISA=avx512_bf16 or
/// set_isa() still select the bf16 products).
inline Isa best_isa() {
  const Isa widest = supported_isas().back();
  return widest == Isa::avx512_bf16 && !detail::bf16_products_pay() ? Isa::avx512 : widest;
}

/// Forces `isa` for every later call in this process (all threads). Throws
/// attn::Error, and changes nothing, when the CPU cannot run it.
inline void set_isa(Isa isa) {
  if (!isa_supported(isa)) detail::fail_isa("set_isa", isa_name(isa));
  detail::isa_override().store(static_cast<int>(isa), std::memory_order_relaxed);
}

/// Undoes set_isa(): back to ATTN_ISA, or to best_isa() when it is unset.
inline void reset_isa() { detail::isa_override().store(-1, std::memory_order_relaxed); }

/// The instruction set the next call will use: set_isa()'s, else ATTN_ISA's,
/// else best_isa(). Throws attn::Error when ATTN_ISA names a set this CPU
/// cannot run or no set at all.
inline Isa active_isa() {
  const int forced = detail::isa_override().load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  const detail::EnvIsa& env = detail::env_isa();
  if (env.isa == -2) detail::fail_isa("ATTN_ISA", env.text);
  if (env.isa >= 0) return static_cast<Isa>(env.isa);
  return best_isa();
}

namespace kernels {

/// The float kernels of `isa` (avx512_bf16 and amx_bf16 share avx512's for float).
inline const KernelSet<float>& float_set(Isa isa) {
#if ATTN_KERNELS_X86
  if (isa == Isa::avx512 || isa == Isa::avx512_bf16 || isa == Isa::amx_bf16) return avx512_set();
  if (isa == Isa::avx2) return avx2_set();
#endif
  (void)isa;
  return portable_set<float>();
}

/// Kernels for accumulation type T on `isa`; double always runs the portable loops.
template <class T>
const KernelSet<T>& kernel_set(Isa isa) {
  if constexpr (std::is_same<T, float>::value)
    return float_set(isa);
  else
    return portable_set<T>();
}

}  // namespace kernels
}  // namespace attn
