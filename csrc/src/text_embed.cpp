// Feature-hashing text embedder: see include/pylb/text_embed.hpp for the algorithm.
#include "pylb/text_embed.hpp"

// XXH_INLINE_ALL: xxHash is header-only here (the system header), so the extension links no libxxhash.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cmath>
#include <cstring>

namespace pylb {
namespace {

bool is_separator(unsigned char c) {
  if (c >= 0x80) return false;  // UTF-8 bytes of non-ASCII letters stay in words
  if (c <= ' ') return true;
  return !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_');
}

void add_feature(const char* data, std::size_t len, float weight, const HashEmbedParams& p, float* out) {
  const std::uint64_t h = XXH3_64bits_withSeed(data, len, p.seed);
  const float sign = (h >> 63) ? -1.0f : 1.0f;
  out[h % p.dim] += sign * weight;
}

}  // namespace

void hash_embed(const char* text, std::size_t len, const HashEmbedParams& p, float* out) {
  std::memset(out, 0, p.dim * sizeof(float));
  std::string word;
  word.reserve(64);
  std::size_t i = 0;
  while (i < len) {
    while (i < len && is_separator(static_cast<unsigned char>(text[i]))) ++i;
    if (i >= len) break;
    word.assign(1, ' ');
    while (i < len && !is_separator(static_cast<unsigned char>(text[i]))) {
      unsigned char c = static_cast<unsigned char>(text[i++]);
      if (c >= 'A' && c <= 'Z') c = static_cast<unsigned char>(c - 'A' + 'a');
      word.push_back(static_cast<char>(c));
    }
    word.push_back(' ');
    // the whole word (with its padding, so it never collides with an inner n-gram)
    add_feature(word.data(), word.size(), p.word_weight, p, out);
    for (std::size_t n = p.ngram_min; n <= p.ngram_max && n <= word.size(); ++n) {
      for (std::size_t s = 0; s + n <= word.size(); ++s) add_feature(word.data() + s, n, 1.0f, p, out);
    }
  }
  double norm = 0.0;
  for (std::size_t d = 0; d < p.dim; ++d) norm += static_cast<double>(out[d]) * out[d];
  if (norm > 0.0) {
    const float inv = static_cast<float>(1.0 / std::sqrt(norm));
    for (std::size_t d = 0; d < p.dim; ++d) out[d] *= inv;
  }
}

void hash_embed_batch(const std::vector<std::string>& texts, const HashEmbedParams& p, float* out) {
  for (std::size_t t = 0; t < texts.size(); ++t) hash_embed(texts[t].data(), texts[t].size(), p, out + t * p.dim);
}

}  // namespace pylb
