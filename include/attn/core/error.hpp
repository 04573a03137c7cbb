// attn/core/error.hpp — the one exception type, the helper that throws it,
// and overflow-checked arithmetic for sizes, strides and offsets that come
// from the caller.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace attn {

/// Thrown for every invalid argument, before any output is written. The
/// message names the argument and the numbers.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
/// Builds "attn: <parts...>" and throws attn::Error.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "attn: ";
  (os << ... << parts);
  throw Error(os.str());
}

/// a · b, or false when it does not fit std::int64_t (no undefined behaviour).
inline bool mul_fits(std::int64_t a, std::int64_t b, std::int64_t& r) {
  return !__builtin_mul_overflow(a, b, &r);
}
/// a + b, or false when it does not fit std::int64_t.
inline bool add_fits(std::int64_t a, std::int64_t b, std::int64_t& r) {
  return !__builtin_add_overflow(a, b, &r);
}

/// a · b for caller-supplied counts; throws attn::Error naming `what` when the
/// product does not fit a 64-bit signed integer.
template <class... Context>
std::int64_t checked_mul(std::int64_t a, std::int64_t b, const Context&... what) {
  std::int64_t r = 0;
  if (!mul_fits(a, b, r)) fail(what..., ": ", a, " · ", b, " overflows a 64-bit integer");
  return r;
}
/// a + b for caller-supplied counts; throws attn::Error naming `what` on overflow.
template <class... Context>
std::int64_t checked_add(std::int64_t a, std::int64_t b, const Context&... what) {
  std::int64_t r = 0;
  if (!add_fits(a, b, r)) fail(what..., ": ", a, " + ", b, " overflows a 64-bit integer");
  return r;
}
}  // namespace detail
}  // namespace attn
