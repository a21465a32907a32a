// Conversion of Python inputs to a 1-D array of 64-bit hashes, shared by the bindings that take
// block hashes or keys.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace pylb::bindings {

using HashArray = pybind11::array_t<std::uint64_t, pybind11::array::c_style | pybind11::array::forcecast>;

// A 1-D array of 64-bit hashes: a numpy integer array (uint64 and C-contiguous: no copy; signed
// values are reinterpreted as two's complement), or any other sequence, converted as
// numpy.asarray(x, dtype=numpy.uint64) would (so Python ints must lie in [0, 2**64)).
// `what` names the argument in error messages.
inline HashArray as_hashes(const pybind11::handle& obj, const char* what) {
  namespace py = pybind11;
  if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj)) {
    throw py::type_error(std::string(what) + " must be a 1-D array or sequence of uint64 hashes, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  if (py::isinstance<py::array>(obj)) {
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    const char kind = arr.dtype().kind();
    if (kind != 'u' && kind != 'i' && arr.size() != 0) {
      throw py::type_error(std::string(what) + " must hold integer hashes, got dtype " +
                           std::string(py::str(arr.dtype())));
    }
  }
  HashArray arr = HashArray::ensure(obj);  // clears the Python error when it fails
  if (!arr) {
    throw py::type_error(std::string(what) +
                         " must be a 1-D array or sequence of uint64 hashes (integers in [0, 2**64)), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(what) + " must be one-dimensional, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  return arr;
}

}  // namespace pylb::bindings
