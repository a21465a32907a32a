// pylb._core: the one extension module. Each area registers its bindings from its own
// register_<area>.cpp; this file only assembles them. Python code imports it only through
// pylb/native.py.
#include <pybind11/pybind11.h>

#include "bindings.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pylb native core: block hashing, dual hash ring, adaptive prefix key, cache mirror, similarity, text embedding, engine-exact (vLLM) block hashes";
  pylb::bindings::register_hashing(m);
  pylb::bindings::register_ring(m);
  pylb::bindings::register_prefix_key(m);
  pylb::bindings::register_mirror(m);
  pylb::bindings::register_similarity(m);
  pylb::bindings::register_text_embed(m);
  pylb::bindings::register_engine_hash(m);
}
