// Chained block hashing of prompts (DESIGN.md §3).
//
// A prompt (bytes, or token ids seen as bytes) is cut into full blocks of `block_bytes`; each
// full block gets one 64-bit hash that also covers everything before it:
//     h_0 = XXH3_64bits_withSeed(block_0, seed)
//     h_i = XXH3_64bits_withSeed(block_i, h_{i-1})
// A trailing partial block gets no hash. Because each hash names the whole prefix up to its
// block, two prompts share their first k hashes exactly when they share their first k blocks,
// which is what vLLM's automatic prefix caching keys its KV blocks on. The chaining is the one
// python-xxhash reproduces with `xxh3_64_intdigest(block, seed=prev)`.
// xxHash is the system header (Debian libxxhash-dev), compiled inline; nothing of it is vendored.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pylb {

// Number of full blocks (= hashes) in a buffer of `len` bytes.
inline std::size_t full_block_count(std::size_t len, std::size_t block_bytes) noexcept {
  return block_bytes == 0 ? 0 : len / block_bytes;
}

// Writes full_block_count(len, block_bytes) chained hashes to `out`; returns that count.
std::size_t chained_block_hashes(const std::uint8_t* data, std::size_t len, std::size_t block_bytes,
                                 std::uint64_t seed, std::uint64_t* out) noexcept;

// One prompt of a batch: its bytes, the block length in bytes, and where its hashes go.
struct ChainJob {
  const std::uint8_t* data;
  std::size_t len;
  std::size_t block_bytes;
  std::uint64_t* out;
};

// Hashes every job as chained_block_hashes would. One chain is a strict dependency chain, so a
// single prompt is latency-bound (one XXH3 call after another); here up to kLanes prompts are
// hashed in lock step so that their independent chains overlap in the CPU's pipeline.
void chained_block_hashes_many(const ChainJob* jobs, std::size_t count, std::uint64_t seed) noexcept;

// One-shot XXH3-64 of a whole buffer (the speed limit the chained form is measured against).
// Both use the system xxhash.h in inline mode (XXH_INLINE_ALL), see block_hash.cpp.
std::uint64_t xxh3_64(const std::uint8_t* data, std::size_t len, std::uint64_t seed) noexcept;

}  // namespace pylb
