// Declarations of the per-area registration functions called by module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace pylb::bindings {
void register_hashing(pybind11::module_& m);
void register_ring(pybind11::module_& m);
void register_prefix_key(pybind11::module_& m);
void register_mirror(pybind11::module_& m);
void register_similarity(pybind11::module_& m);
void register_text_embed(pybind11::module_& m);
void register_engine_hash(pybind11::module_& m);
}  // namespace pylb::bindings
