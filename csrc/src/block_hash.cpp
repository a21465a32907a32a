// Chained block hashing; the design comment and formula are in include/pylb/block_hash.hpp.
#include "pylb/block_hash.hpp"

#include <xxhash.h>

namespace pylb {

std::size_t chained_block_hashes(const std::uint8_t* data, std::size_t len, std::size_t block_bytes,
                                 std::uint64_t seed, std::uint64_t* out) noexcept {
  const std::size_t blocks = full_block_count(len, block_bytes);
  std::uint64_t prev = seed;
  for (std::size_t i = 0; i < blocks; ++i) {
    prev = XXH3_64bits_withSeed(data + i * block_bytes, block_bytes, prev);
    out[i] = prev;
  }
  return blocks;
}

std::uint64_t xxh3_64(const std::uint8_t* data, std::size_t len, std::uint64_t seed) noexcept {
  return XXH3_64bits_withSeed(data, len, seed);
}

}  // namespace pylb
