// Engine-exact block hashes: vLLM's prefix-caching block hashes, computed outside vLLM.
//
// vLLM (v1 engine, 0.1x-0.32; `vllm/v1/core/kv_cache_utils.py: hash_block_tokens`) names each
// full block of `block_size` prompt tokens by a chained hash over token ids:
//
//     h_0 = H((NONE_HASH, tuple(tokens[0:B]), extra_keys_0))
//     h_i = H((h_{i-1},   tuple(tokens[iB:(i+1)B]), extra_keys_i))
//
// With `--prefix-caching-hash-algo sha256_cbor`, H(x) = SHA-256(cbor2.dumps(x, canonical=True))
// (`vllm/utils/hashing.py`), and NONE_HASH = H(seed) for the seed string "vllm-none-hash"
// (`DEFAULT_NONE_HASH_SEED`; PYTHONHASHSEED replaces it when set in vLLM's environment). The CBOR
// of the 3-tuple is fixed-layout for plain text prompts (no LoRA, multi-modal input, cache_salt
// or prompt embeddings, whose extra keys are not None):
//
//     0x83                          array of 3
//     0x58 0x20 <32 bytes>          the parent hash, a byte string of 32
//     <array header of B> <B uints> the block's token ids, each in CBOR's shortest uint form
//     0xf6                          None (no extra keys)
//
// vLLM's KV events carry these 32-byte hashes (or, with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES,
// their low 64 bits: int.from_bytes(h, "big") & (2**64 - 1)). pylb keys its mirror by that same
// 64-bit value, the hash's last 8 bytes read big-endian (`engine_key`). SHA-256 comes from the
// system's OpenSSL libcrypto (Debian libssl-dev); nothing is vendored.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pylb {

using EngineHash = std::array<std::uint8_t, 32>;

// SHA-256 of the canonical CBOR of a text string: vLLM's NONE_HASH for seed `seed`.
EngineHash engine_none_hash(const std::string& seed);

// The 64-bit mirror key of an engine hash: its last 8 bytes, big-endian.
std::uint64_t engine_key(const EngineHash& h) noexcept;

// Hashes the n / block_size full blocks of `tokens` as described above, starting from `parent`
// (NONE_HASH for a whole prompt). Writes one key per full block to `keys` (if not null) and the
// full 32-byte hashes to `hashes` (if not null; 32 bytes per block). Returns the number of blocks.
std::size_t engine_block_hashes(const std::uint32_t* tokens, std::size_t n, std::size_t block_size,
                                const EngineHash& parent, std::uint64_t* keys, std::uint8_t* hashes);

}  // namespace pylb
