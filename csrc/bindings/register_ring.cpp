// Bindings for the dual consistent-hash ring (include/pylb/dual_ring.hpp). Arguments are checked
// here for their Python types (TypeError); values are checked by the core (std::invalid_argument,
// which pybind11 raises as ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "pylb/dual_ring.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {

std::string type_name(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }

std::vector<std::string> to_names(const py::object& replica_ids) {
  if (py::isinstance<py::str>(replica_ids) || py::isinstance<py::bytes>(replica_ids)) {
    throw py::type_error("replica_ids must be a sequence of str (one name per replica), not a single " +
                         type_name(replica_ids) + ": wrap it in a list");
  }
  if (!py::isinstance<py::iterable>(replica_ids)) {
    throw py::type_error("replica_ids must be a sequence of str, got " + type_name(replica_ids));
  }
  std::vector<std::string> names;
  std::size_t i = 0;
  for (const py::handle item : replica_ids) {
    if (!py::isinstance<py::str>(item)) {
      throw py::type_error("replica_ids[" + std::to_string(i) + "] must be str, got " + type_name(item) + " " +
                           std::string(py::repr(item)));
    }
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(item.ptr(), &size);
    if (utf8 == nullptr) {  // e.g. a lone surrogate
      PyErr_Clear();
      throw py::value_error("replica_ids[" + std::to_string(i) + "] is not encodable as UTF-8: " +
                            std::string(py::repr(item)));
    }
    names.emplace_back(utf8, static_cast<std::size_t>(size));
    ++i;
  }
  return names;
}

std::vector<double> to_weights(const py::object& weights) {
  std::vector<double> out;
  if (weights.is_none()) return out;
  if (py::isinstance<py::str>(weights) || !py::isinstance<py::iterable>(weights)) {
    throw py::type_error("weights must be None or a sequence of numbers, got " + type_name(weights));
  }
  std::size_t i = 0;
  for (const py::handle item : weights) {
    // Real numbers only (int, float, numpy scalars); not str, bool-like containers or complex.
    if (py::isinstance<py::str>(item) || PyComplex_Check(item.ptr()) || !PyNumber_Check(item.ptr())) {
      throw py::type_error("weights[" + std::to_string(i) + "] must be a number, got " + type_name(item) + " " +
                           std::string(py::repr(item)));
    }
    out.push_back(py::float_(py::reinterpret_borrow<py::object>(item)).cast<double>());
    ++i;
  }
  return out;
}

std::uint64_t to_key(const py::handle& key) {
  if (!PyIndex_Check(key.ptr()) || PyBool_Check(key.ptr())) {
    throw py::type_error("key must be an int (a 64-bit hash), got " + type_name(key));
  }
  py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(key.ptr()));
  if (!as_int) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(as_int.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("key must be in [0, 2**64), got " + std::string(py::repr(as_int)));
  }
  return static_cast<std::uint64_t>(v);
}

int to_ring(int ring) {
  if (ring != 0 && ring != 1) throw py::value_error("ring must be 0 or 1, got " + std::to_string(ring));
  return ring;
}

// A C-contiguous native-order uint64 view of `keys`. numpy arrays must already have an unsigned
// 64-bit dtype (no silent casts of signed or float hashes); other sequences are converted with
// numpy.asarray(keys, dtype=numpy.uint64).
using KeyArray = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

KeyArray to_keys(const py::object& keys) {
  if (py::isinstance<py::array>(keys)) {
    const py::dtype dt = py::reinterpret_borrow<py::array>(keys).dtype();
    if (dt.kind() != 'u' || dt.itemsize() != 8) {
      throw py::type_error("keys must be a numpy array of dtype uint64, got dtype " + std::string(py::str(dt)) +
                           " (convert with keys.astype(numpy.uint64), or keys.view(numpy.uint64) for int64 hashes)");
    }
    return KeyArray::ensure(keys);  // copies only when not C-contiguous or not native byte order
  }
  if (py::isinstance<py::str>(keys) || py::isinstance<py::bytes>(keys)) {
    throw py::type_error("keys must be a numpy uint64 array or a sequence of int, got " + type_name(keys));
  }
  py::module_ np = py::module_::import("numpy");
  try {
    return np.attr("asarray")(keys, py::arg("dtype") = np.attr("uint64")).cast<KeyArray>();
  } catch (py::error_already_set& e) {
    if (e.matches(PyExc_OverflowError) || e.matches(PyExc_ValueError)) {
      throw py::value_error("keys must hold ints in [0, 2**64): " + std::string(py::str(e.value())));
    }
    if (e.matches(PyExc_TypeError)) {
      throw py::type_error("keys must be a numpy uint64 array or a sequence of int: " + std::string(py::str(e.value())));
    }
    throw;
  }
}

std::vector<py::ssize_t> shape_of(const KeyArray& a) {
  return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

py::array_t<std::int32_t> owners_batch(const DualRing& ring, const py::object& keys_obj, int which) {
  const int r = to_ring(which);
  const KeyArray keys = to_keys(keys_obj);
  py::array_t<std::int32_t> out(shape_of(keys));
  const std::uint64_t* src = keys.data();
  std::int32_t* dst = out.mutable_data();
  const auto n = static_cast<std::size_t>(keys.size());
  {
    // Safe without the GIL: the ring is immutable and kept alive by the caller's reference to
    // `self`; we read only the key buffer (held by `keys`) and write the fresh output array.
    py::gil_scoped_release release;
    ring.owners_batch(src, n, r, dst);
  }
  return out;
}

py::tuple candidates_batch(const DualRing& ring, const py::object& keys_obj) {
  const KeyArray keys = to_keys(keys_obj);
  py::array_t<std::int32_t> a(shape_of(keys));
  py::array_t<std::int32_t> b(shape_of(keys));
  const std::uint64_t* src = keys.data();
  std::int32_t* da = a.mutable_data();
  std::int32_t* db = b.mutable_data();
  const auto n = static_cast<std::size_t>(keys.size());
  {
    // Safe without the GIL: the ring is immutable and kept alive by the caller's reference to
    // `self`; we read only the key buffer (held by `keys`) and write the two fresh arrays.
    py::gil_scoped_release release;
    ring.candidates_batch(src, n, da, db);
  }
  return py::make_tuple(a, b);
}

py::tuple as_tuple(const std::vector<std::string>& v) {
  py::tuple t(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) t[i] = py::str(v[i]);
  return t;
}

template <class T>
py::tuple as_tuple(const std::vector<T>& v) {
  py::tuple t(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) t[i] = py::cast(v[i]);
  return t;
}

}  // namespace

void register_ring(py::module_& m) {
  py::class_<DualRing>(m, "DualRing", R"doc(
Two independent consistent-hash rings over the same replicas (DualMap's candidate pair).

DualRing(replica_ids, vnodes=256, weights=None, *, probes=4)

replica_ids: sequence of unique, non-empty str (e.g. replica URLs). Placement is a pure
    function of the names and weights: every router process with the same membership gets the
    same candidates, whatever the order of the list (indices refer to this list).
vnodes: points per replica per ring for a replica of mean weight (>= 1).
weights: optional relative capacities (finite, > 0), one per replica; replica i gets
    max(1, round(vnodes * weights[i] / mean(weights))) points on each ring.
probes: multi-probe count (1..64): each key is hashed `probes` times per ring and goes to
    the point nearest after any probe; it evens out the shares (about 2.3 % relative spread at
    probes=4 and vnodes=256, against about 6 % with one probe) and keeps perfect consistency.

candidates(key) gives (a, b): a is the key's owner on ring 0; b its owner on ring 1, or, when
that is a, the next replica other than a clockwise on ring 1. a != b whenever there are two or
more replicas; (0, 0) with one. Adding a replica moves about 1/(N+1) of the keys on each ring,
all onto it; removing one moves only its keys. The ring is immutable: build a new one when the
membership changes. Lookups are thread-safe and the batch forms release the GIL.

Raises ValueError for no replicas, empty or duplicate names, vnodes < 1, probes outside 1..64,
weights of the wrong length or not finite and > 0; TypeError for arguments of the wrong type.
)doc")
      .def(py::init([](const py::object& replica_ids, std::int64_t vnodes, const py::object& weights,
                       std::int64_t probes) {
             return DualRing(to_names(replica_ids), vnodes, to_weights(weights), probes);
           }),
           py::arg("replica_ids"), py::arg("vnodes") = DualRing::kDefaultVnodes, py::arg("weights") = py::none(),
           py::kw_only(), py::arg("probes") = DualRing::kDefaultProbes)
      .def(
          "candidates",
          [](const DualRing& ring, const py::handle& key) {
            const auto ab = ring.candidates(to_key(key));
            return py::make_tuple(ab.first, ab.second);
          },
          py::arg("key"),
          "candidates(key: int) -> tuple[int, int]: the two candidate replica indices (a, b) of a 64-bit key "
          "(int in [0, 2**64)); a != b when there are two or more replicas.")
      .def("candidates_batch", &candidates_batch, py::arg("keys"),
           "candidates_batch(keys: numpy.ndarray[uint64]) -> (a, b): candidates of many keys at once, as two int32 "
           "arrays of the keys' shape. numpy arrays must have dtype uint64; other sequences of int are converted. "
           "Releases the GIL.")
      .def(
          "owner",
          [](const DualRing& ring, const py::handle& key, int which) { return ring.owner(to_key(key), to_ring(which)); },
          py::arg("key"), py::arg("ring"),
          "owner(key: int, ring: int) -> int: the raw owner of `key` on ring 0 or 1 (before the a != b rule).")
      .def("owners_batch", &owners_batch, py::arg("keys"), py::arg("ring"),
           "owners_batch(keys: numpy.ndarray[uint64], ring: int) -> numpy.ndarray[int32]: raw owners on ring 0 or 1 "
           "of many keys at once (before the a != b rule). Releases the GIL.")
      .def_property_readonly(
          "replica_ids", [](const DualRing& ring) { return as_tuple(ring.replica_ids()); },
          "The replica names, in the order given (candidate indices refer to it).")
      .def_property_readonly("vnodes", &DualRing::vnodes, "Points per replica per ring at mean weight.")
      .def_property_readonly("probes", &DualRing::probes, "Probes per key per ring (multi-probe consistent hashing).")
      .def_property_readonly(
          "weights", [](const DualRing& ring) { return as_tuple(ring.weights()); },
          "The relative weights, one per replica (all 1.0 when none were given).")
      .def_property_readonly(
          "vnode_counts", [](const DualRing& ring) { return as_tuple(ring.vnode_counts()); },
          "Points each replica has on each ring, after weighting.")
      .def("__len__", &DualRing::size, "Number of replicas.")
      .def("__repr__", [](const DualRing& ring) {
        return "DualRing(" + std::to_string(ring.size()) + " replicas, vnodes=" + std::to_string(ring.vnodes()) +
               ", probes=" + std::to_string(ring.probes()) + ")";
      });
}

}  // namespace pylb::bindings
