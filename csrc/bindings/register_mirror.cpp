#include "bindings.hpp"

namespace pylb::bindings {
void register_mirror(pybind11::module_& /*m*/) {}
}  // namespace pylb::bindings
