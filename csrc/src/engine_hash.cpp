// Engine-exact block hashes (see include/pylb/engine_hash.hpp for the format and its source).
#include "pylb/engine_hash.hpp"

#include <openssl/sha.h>

#include <cstring>
#include <vector>

namespace pylb {
namespace {

// Appends CBOR's shortest encoding of an unsigned integer with major type `major` (0: uint,
// 4: array header) to `out` at `pos`; returns the new position. `out` must have 9 bytes free.
inline std::size_t put_head(std::uint8_t* out, std::size_t pos, std::uint8_t major, std::uint64_t v) noexcept {
  const auto mt = static_cast<std::uint8_t>(major << 5);
  if (v < 24) {
    out[pos++] = static_cast<std::uint8_t>(mt | v);
  } else if (v <= 0xFF) {
    out[pos++] = static_cast<std::uint8_t>(mt | 24);
    out[pos++] = static_cast<std::uint8_t>(v);
  } else if (v <= 0xFFFF) {
    out[pos++] = static_cast<std::uint8_t>(mt | 25);
    out[pos++] = static_cast<std::uint8_t>(v >> 8);
    out[pos++] = static_cast<std::uint8_t>(v);
  } else if (v <= 0xFFFFFFFFull) {
    out[pos++] = static_cast<std::uint8_t>(mt | 26);
    for (int s = 24; s >= 0; s -= 8) out[pos++] = static_cast<std::uint8_t>(v >> s);
  } else {
    out[pos++] = static_cast<std::uint8_t>(mt | 27);
    for (int s = 56; s >= 0; s -= 8) out[pos++] = static_cast<std::uint8_t>(v >> s);
  }
  return pos;
}

}  // namespace

EngineHash engine_none_hash(const std::string& seed) {
  std::vector<std::uint8_t> buf(seed.size() + 9);
  std::size_t pos = put_head(buf.data(), 0, 3, seed.size());  // major type 3: text string
  std::memcpy(buf.data() + pos, seed.data(), seed.size());
  EngineHash out{};
  SHA256(buf.data(), pos + seed.size(), out.data());
  return out;
}

std::uint64_t engine_key(const EngineHash& h) noexcept {
  std::uint64_t k = 0;
  for (std::size_t i = 24; i < 32; ++i) k = (k << 8) | h[i];
  return k;
}

std::size_t engine_block_hashes(const std::uint32_t* tokens, std::size_t n, std::size_t block_size,
                                const EngineHash& parent, std::uint64_t* keys, std::uint8_t* hashes) {
  if (block_size == 0) return 0;
  const std::size_t blocks = n / block_size;
  // one block's CBOR: 1 + 2 + 32 (parent) + 9 (array head) + 5 per token + 1 (None)
  std::vector<std::uint8_t> buf(1 + 2 + 32 + 9 + 5 * block_size + 1);
  EngineHash prev = parent;
  for (std::size_t b = 0; b < blocks; ++b) {
    std::uint8_t* out = buf.data();
    std::size_t pos = 0;
    out[pos++] = 0x83;
    out[pos++] = 0x58;
    out[pos++] = 0x20;
    std::memcpy(out + pos, prev.data(), 32);
    pos += 32;
    pos = put_head(out, pos, 4, block_size);
    const std::uint32_t* t = tokens + b * block_size;
    for (std::size_t i = 0; i < block_size; ++i) pos = put_head(out, pos, 0, t[i]);
    out[pos++] = 0xf6;
    SHA256(out, pos, prev.data());
    if (keys != nullptr) keys[b] = engine_key(prev);
    if (hashes != nullptr) std::memcpy(hashes + 32 * b, prev.data(), 32);
  }
  return blocks;
}

}  // namespace pylb
