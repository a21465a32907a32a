// Bindings for the feature-hashing text embedder (include/pylb/text_embed.hpp). The semantic
// cache uses it through pylb.native.hash_embed.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "pylb/text_embed.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {

py::array_t<float> hash_embed(const std::vector<std::string>& texts, long long dim, long long ngram_min, long long ngram_max,
                              double word_weight, std::uint64_t seed) {
  if (dim < 8 || dim > 65536) throw py::value_error("dim must be in [8, 65536], got " + std::to_string(dim));
  if (ngram_min < 1 || ngram_max < ngram_min || ngram_max > 16) {
    throw py::value_error("n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16, got " + std::to_string(ngram_min) + ", " +
                          std::to_string(ngram_max));
  }
  if (!(word_weight >= 0.0)) throw py::value_error("word_weight must be >= 0, got " + std::to_string(word_weight));
  HashEmbedParams p;
  p.dim = static_cast<std::size_t>(dim);
  p.ngram_min = static_cast<std::size_t>(ngram_min);
  p.ngram_max = static_cast<std::size_t>(ngram_max);
  p.word_weight = static_cast<float>(word_weight);
  p.seed = seed;
  py::array_t<float> out({static_cast<py::ssize_t>(texts.size()), static_cast<py::ssize_t>(dim)});
  float* dst = out.mutable_data();
  {
    // Safe without the GIL: `texts` is a C++ copy (std::vector<std::string>) and `out` a fresh
    // array owned by this frame; no Python object is touched.
    py::gil_scoped_release release;
    hash_embed_batch(texts, p, dst);
  }
  return out;
}

}  // namespace

void register_text_embed(py::module_& m) {
  m.def("hash_embed", &hash_embed, py::arg("texts"), py::arg("dim") = 384, py::arg("ngram_min") = 3, py::arg("ngram_max") = 5,
        py::arg("word_weight") = 1.0, py::arg("seed") = 0,
        "Feature-hashing embeddings of `texts` (str, UTF-8 encoded): float32 [len(texts), dim], each row L2-normalised "
        "(all zero for a text without words). Character n-grams of each lower-cased word plus the word itself, "
        "signed XXH3 feature hashing. The GIL is released while embedding.");
}

}  // namespace pylb::bindings
