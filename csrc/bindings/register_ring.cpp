#include "bindings.hpp"

namespace pylb::bindings {
void register_ring(pybind11::module_& /*m*/) {}
}  // namespace pylb::bindings
