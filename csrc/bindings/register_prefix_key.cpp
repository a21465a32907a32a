#include "bindings.hpp"

namespace pylb::bindings {
void register_prefix_key(pybind11::module_& /*m*/) {}
}  // namespace pylb::bindings
