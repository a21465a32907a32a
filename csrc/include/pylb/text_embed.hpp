// Feature-hashing text embedder (the semantic cache's built-in `hashing` embedder).
//
// What: a text -> a float32 vector of `dim` values, L2-normalised, with no model. Each word
// (a maximal run of bytes that are not ASCII whitespace or punctuation, ASCII letters lower-cased)
// is padded with one space on each side, and every byte n-gram of it for n in [ngram_min,
// ngram_max] is hashed with XXH3-64 (seeded); the n-gram adds +1 or -1 (the hash's top bit: the
// signed feature hashing of Weinberger et al., 2009, so that collisions cancel on average) at
// index hash % dim. Whole words are features too (n-grams of a short word such as "not" are few,
// so the word itself carries the meaning), with weight `word_weight`. The vector is then divided
// by its L2 norm (a text with no word stays all zero: its cosine with everything is 0).
// Parameters: dim 64..8192 (384 by default, the size of all-MiniLM); n-grams 3..5 follow the
// char_wb analyzers of common libraries; seed picks another hash family.
// Texts with the same words in the same multiplicity embed identically (word order is lost), so
// the cache's guards and the exact-match step carry what this embedder cannot see.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pylb {

struct HashEmbedParams {
  std::size_t dim = 384;
  std::size_t ngram_min = 3;
  std::size_t ngram_max = 5;
  float word_weight = 1.0f;
  std::uint64_t seed = 0;
};

// Embed one text into out[0..dim) (overwritten).
void hash_embed(const char* text, std::size_t len, const HashEmbedParams& p, float* out);

// Embed many texts: out is [texts.size(), dim], row-major.
void hash_embed_batch(const std::vector<std::string>& texts, const HashEmbedParams& p, float* out);

}  // namespace pylb
