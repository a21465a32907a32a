#include "bindings.hpp"

namespace pylb::bindings {
void register_similarity(pybind11::module_& /*m*/) {}
}  // namespace pylb::bindings
