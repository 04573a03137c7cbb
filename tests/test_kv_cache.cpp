// Tests of the KV caches: contiguous KVCache and PagedKVCache storage
// (append, lengths, int8 rows, fork / copy-on-write / free / reuse) and every
// misuse an attn::Error with nothing written.
#include "support.hpp"

#include <attn/kv/cache.hpp>
#include <attn/kv/paged.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using attn_test::index_t;
using attn_test::Layout;
using attn_test::random_tensor;
using attn_test::Tensor;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const attn::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(KVCache, AppendStoresRowsAndLengths) {
  const index_t B = 2, H = 3, C = 10, D = 5, Dv = 7;
  attn::KVCache<float> cache(B, H, C, D, Dv);
  const auto k1 = random_tensor<float>(B, H, 4, D, 1, Layout::bshd);
  const auto v1 = random_tensor<float>(B, H, 4, Dv, 2);
  cache.append(k1.cview(), v1.cview());
  const auto k2 = random_tensor<float>(1, H, 3, D, 3);
  const auto v2 = random_tensor<float>(1, H, 3, Dv, 4);
  cache.append(1, k2.cview(), v2.cview());
  EXPECT_EQ(cache.length(0), 4);
  EXPECT_EQ(cache.length(1), 7);
  const auto K = cache.keys(1), V = cache.values(1);
  ASSERT_EQ(K.extent(2), 7);
  for (index_t h = 0; h < H; ++h) {
    for (index_t t = 0; t < 4; ++t)
      for (index_t c = 0; c < D; ++c) EXPECT_EQ(K(0, h, t, c), k1(1, h, t, c));
    for (index_t t = 0; t < 3; ++t)
      for (index_t c = 0; c < Dv; ++c) EXPECT_EQ(V(0, h, 4 + t, c), v2(0, h, t, c));
  }
  cache.truncate(1, 2);
  EXPECT_EQ(cache.length(1), 2);
  cache.clear();
  EXPECT_EQ(cache.length(0), 0);
}

// Storage of 4 MiB or more starts on a 2 MiB boundary, the alignment a
// transparent huge page needs (core/memory.hpp), in both caches and for every
// element type; smaller storage on a cache line.
TEST(KVCache, LargeStorageIsHugePageAligned) {
  const auto offset = [](const void* p, std::uintptr_t align) {
    return reinterpret_cast<std::uintptr_t>(p) % align;
  };
  constexpr std::uintptr_t huge = std::uintptr_t{2} << 20;
  const attn::KVCache<float> big(1, 8, 1024, 128);           // 4 MiB of keys
  const attn::KVCache<std::int8_t> big8(2, 8, 2048, 128);    // 4 MiB of codes
  const attn::PagedKVCache<float> pool(64, 16, 8, 128, 64);  // 4 MiB of keys, 2 of values
  const attn::KVCache<float> small(1, 2, 16, 8);
  EXPECT_EQ(offset(big.keys().data(), huge), 0u);
  EXPECT_EQ(offset(big.values().data(), huge), 0u);
  EXPECT_EQ(offset(big8.keys().data(), huge), 0u);
  EXPECT_EQ(offset(pool.pool_keys().data(), huge), 0u);
  EXPECT_EQ(offset(pool.pool_values().data(), 64), 0u);
  EXPECT_EQ(offset(small.keys().data(), 64), 0u);
  EXPECT_EQ(offset(small.values().data(), 64), 0u);
}

TEST(KVCache, Int8RowsWithinHalfAScale) {
  const index_t H = 2, D = 33;
  attn::KVCache<std::int8_t> cache(1, H, 8, D);
  const auto k = random_tensor<float>(1, H, 8, D, 5, Layout::bhsd, 3.0);
  const auto v = random_tensor<float>(1, H, 8, D, 6);
  cache.append(0, k.cview(), v.cview());
  const auto K = cache.keys(0);
  const auto S = cache.key_scales();
  for (index_t h = 0; h < H; ++h)
    for (index_t t = 0; t < 8; ++t) {
      double amax = 0;
      for (index_t c = 0; c < D; ++c) amax = std::max(amax, std::abs(double(k(0, h, t, c))));
      EXPECT_FLOAT_EQ(S(0, h, t), static_cast<float>(amax / 127.0));
      for (index_t c = 0; c < D; ++c)
        EXPECT_LE(std::abs(S(0, h, t) * K(0, h, t, c) - k(0, h, t, c)), amax / 254.0 * 1.0001);
    }
}

TEST(KVCache, MisuseThrowsAndWritesNothing) {
  attn::KVCache<float> cache(2, 2, 4, 8);
  const auto k = random_tensor<float>(2, 2, 3, 8, 1), v = random_tensor<float>(2, 2, 3, 8, 2);
  cache.append(k.cview(), v.cview());
  const std::vector<float> before(cache.keys().data(), cache.keys().data() + 2 * 2 * 4 * 8);
  EXPECT_NE(error_of([&] {
              cache.append(k.cview(), v.cview());
            }).find("appending 3 tokens to sequence 0 of length 3 passes the KVCache capacity 4"),
            std::string::npos);
  const auto bad_k = random_tensor<float>(2, 2, 1, 7, 1);
  const auto v1 = random_tensor<float>(2, 2, 1, 8, 1);
  EXPECT_NE(error_of([&] {
              cache.append(bad_k.cview(), v1.cview());
            }).find("k has shape [2, 2, 1, 7], expected [2, 2, n, 8]"),
            std::string::npos);
  const auto k1 = random_tensor<float>(1, 2, 1, 8, 1);
  EXPECT_NE(error_of([&] {
              cache.append(2, k1.cview(), k1.cview());
            }).find("sequence 2 is outside [0, 2)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cache.append(k.cview(), v1.cview()); }).find("v has shape [2, 2, 1, 8]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cache.truncate(0, 5); }).find("truncate length 5 of sequence 0"),
            std::string::npos);
  const std::vector<float> after(cache.keys().data(), cache.keys().data() + 2 * 2 * 4 * 8);
  EXPECT_EQ(before, after);
  EXPECT_EQ(cache.length(0), 3);
  EXPECT_EQ(cache.length(1), 3);

  attn::KVCache<std::int8_t> q8(1, 1, 4, 2);
  Tensor<float> nan_k(1, 1, 1, 2);
  nan_k.buf[1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(error_of([&] {
              q8.append(0, nan_k.cview(), nan_k.cview());
            }).find("k(0, 0, 0, 1) is nan; an int8 cache stores finite values only"),
            std::string::npos);
  EXPECT_EQ(q8.length(0), 0);
  EXPECT_NE(error_of([] { attn::KVCache<float>(1, 0, 4, 8); }).find("kv_heads is 0"),
            std::string::npos);
}

// --------------------------------------------------------------- paged --

/// Token t of a paged sequence, head h, element c.
template <class T>
T paged_key(const attn::PagedKVCache<T>& c, index_t seq, index_t h, index_t t, index_t e) {
  const index_t blk = c.block_table(seq)[static_cast<std::size_t>(t / c.block_size())];
  return c.pool_keys()(blk, h, t % c.block_size(), e);
}

TEST(PagedKVCache, AppendAcrossBlocks) {
  attn::PagedKVCache<float> c(8, 4, 2, 3);
  const index_t s = c.add_sequence();
  const auto k = random_tensor<float>(1, 2, 9, 3, 1), v = random_tensor<float>(1, 2, 9, 3, 2);
  c.append(s, k.cview(), v.cview());
  EXPECT_EQ(c.length(s), 9);
  EXPECT_EQ(c.block_table(s), (std::vector<index_t>{0, 1, 2}));
  EXPECT_EQ(c.free_blocks(), 5);
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 0; t < 9; ++t)
      for (index_t e = 0; e < 3; ++e) EXPECT_EQ(paged_key(c, s, h, t, e), k(0, h, t, e));
}

TEST(PagedKVCache, ForkSharesThenCopiesOnWrite) {
  attn::PagedKVCache<float> c(8, 4, 1, 2);
  const index_t a = c.add_sequence();
  const auto k = random_tensor<float>(1, 1, 6, 2, 1), v = random_tensor<float>(1, 1, 6, 2, 2);
  c.append(a, k.cview(), v.cview());  // blocks 0 (full), 1 (2 of 4)
  const index_t b = c.fork(a);
  EXPECT_EQ(c.block_table(b), c.block_table(a));
  EXPECT_EQ(c.ref_count(0), 2);
  EXPECT_EQ(c.ref_count(1), 2);
  EXPECT_EQ(c.blocks_needed(b, 1), 1);  // the shared partial block is copied
  const auto k1 = random_tensor<float>(1, 1, 1, 2, 3), v1 = random_tensor<float>(1, 1, 1, 2, 4);
  c.append(b, k1.cview(), v1.cview());
  EXPECT_EQ(c.block_table(b)[0], 0);  // the full block stays shared
  EXPECT_NE(c.block_table(b)[1], 1);
  EXPECT_EQ(c.ref_count(1), 1);
  for (index_t t = 0; t < 6; ++t)
    for (index_t e = 0; e < 2; ++e) {
      EXPECT_EQ(paged_key(c, b, 0, t, e), k(0, 0, t, e));
      EXPECT_EQ(paged_key(c, a, 0, t, e), k(0, 0, t, e));
    }
  EXPECT_EQ(paged_key(c, b, 0, 6, 1), k1(0, 0, 0, 1));
  EXPECT_EQ(c.length(a), 6);
  // a now owns block 1 alone and appends in place.
  EXPECT_EQ(c.blocks_needed(a, 2), 0);
  c.append(a, k1.cview(), v1.cview());
  EXPECT_EQ(c.block_table(a)[1], 1);

  // free: blocks return when no sequence holds them, and are reused lowest first.
  const index_t free_before = c.free_blocks();
  c.free(a);
  EXPECT_EQ(c.free_blocks(), free_before + 1);  // block 1; block 0 is still b's
  EXPECT_EQ(c.ref_count(0), 1);
  EXPECT_FALSE(c.is_live(a));
  const index_t d = c.add_sequence();
  EXPECT_EQ(d, a);  // ids are reused
  c.append(d, k1.cview(), v1.cview());
  EXPECT_EQ(c.block_table(d)[0], 1);
  c.free(b);
  c.free(d);
  EXPECT_EQ(c.free_blocks(), 8);
}

TEST(PagedKVCache, MisuseThrowsAndWritesNothing) {
  attn::PagedKVCache<float> c(3, 4, 1, 2);
  const index_t s = c.add_sequence();
  const auto k = random_tensor<float>(1, 1, 10, 2, 1), v = random_tensor<float>(1, 1, 10, 2, 2);
  c.append(s, k.cview(), v.cview());  // 3 blocks, all of the pool
  const std::vector<float> before(c.pool_keys().data(), c.pool_keys().data() + 3 * 4 * 2);
  const auto k3 = random_tensor<float>(1, 1, 3, 2, 3), v3 = random_tensor<float>(1, 1, 3, 2, 4);
  EXPECT_NE(error_of([&] {
              c.append(s, k3.cview(), v3.cview());
            }).find("appending 3 tokens to sequence 0 needs 1 free blocks, the pool has 0 of 3"),
            std::string::npos);
  EXPECT_EQ(c.length(s), 10);
  const index_t f = c.fork(s);
  EXPECT_NE(error_of([&] { c.append(f, k3.cview(), v3.cview()); }).find("needs 2 free blocks"),
            std::string::npos);
  c.free(f);
  EXPECT_NE(error_of([&] { c.append(f, k3.cview(), v3.cview()); }).find("sequence 1 was freed"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.free(f); }).find("sequence 1 was freed"), std::string::npos);
  EXPECT_NE(
      error_of([&] { c.length(7); }).find("sequence 7 is not a sequence of this PagedKVCache"),
      std::string::npos);
  EXPECT_NE(error_of([&] { c.ref_count(3); }).find("block 3 is outside [0, 3)"), std::string::npos);
  const auto bad = random_tensor<float>(1, 2, 1, 2, 5);
  EXPECT_NE(error_of([&] {
              c.append(s, bad.cview(), bad.cview());
            }).find("k has shape [1, 2, 1, 2], expected [1, 1, n, 2]"),
            std::string::npos);
  const std::vector<float> after(c.pool_keys().data(), c.pool_keys().data() + 3 * 4 * 2);
  EXPECT_EQ(before, after);
  EXPECT_EQ(c.free_blocks(), 0);
  EXPECT_NE(error_of([] { attn::PagedKVCache<float>(4, 0, 1, 2); }).find("block_size is 0"),
            std::string::npos);
}

}  // namespace
