// attn/core/eigen.hpp — the one place attn includes Eigen.
//
// g++ 12 reports -W(maybe-)uninitialized inside its own AVX-512 intrinsic
// headers (the `__m512 __Y = __Y;` idiom of avx512fintrin.h) wherever Eigen's
// AVX-512 packet code is inlined, which floods a `-Wall -march=native` build
// on an AVX-512 machine with warnings about code that is neither attn's nor
// the user's. The intrinsic headers are first read here, inside a region that
// silences exactly those two warnings; the region ends before any attn code.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <Eigen/Core>
#include <Eigen/QR>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
