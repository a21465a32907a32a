// Bindings for the cache mirror (include/pylb/cache_mirror.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "bindings.hpp"
#include "hash_array.hpp"
#include "pylb/cache_mirror.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {


std::size_t replica_index(const CacheMirror& m, long long replica) {
  if (replica < 0 || static_cast<unsigned long long>(replica) >= m.num_replicas()) {
    throw py::index_error("replica " + std::to_string(replica) + " out of range for " +
                          std::to_string(m.num_replicas()) + " replicas");
  }
  return static_cast<std::size_t>(replica);
}

std::size_t non_negative(long long value, const char* field) {
  if (value < 0) throw py::value_error(std::string(field) + " must be >= 0, got " + std::to_string(value));
  return static_cast<std::size_t>(value);
}

CacheMirror make_mirror(long long num_replicas, long long capacity_blocks) {
  return CacheMirror(non_negative(num_replicas, "num_replicas"), non_negative(capacity_blocks, "capacity_blocks"));
}

py::array_t<std::int64_t> match(const CacheMirror& m, const py::handle& hashes) {
  const HashArray h = as_hashes(hashes, "hashes");
  py::array_t<std::int64_t> out(static_cast<py::ssize_t>(m.num_replicas()));
  std::int64_t* dst = out.mutable_data();
  const std::uint64_t* src = h.data();
  const auto n = static_cast<std::size_t>(h.size());
  {
    // Safe without the GIL: only C++ state and two buffers we hold references to (the input
    // array `h` and the fresh output) are touched. The mirror itself is not thread-safe; the
    // router serialises access to it (see the class docstring).
    py::gil_scoped_release release;
    m.match(src, n, dst);
  }
  return out;
}

std::size_t insert(CacheMirror& m, long long replica, const py::handle& hashes) {
  const std::size_t r = replica_index(m, replica);
  const HashArray h = as_hashes(hashes, "hashes");
  const std::uint64_t* src = h.data();
  const auto n = static_cast<std::size_t>(h.size());
  // Safe without the GIL: touches only the mirror's C++ state and the held input buffer; callers
  // serialise access to the mirror.
  py::gil_scoped_release release;
  return m.insert(r, src, n);
}

std::size_t remove(CacheMirror& m, long long replica, const py::handle& hashes) {
  const std::size_t r = replica_index(m, replica);
  const HashArray h = as_hashes(hashes, "hashes");
  const std::uint64_t* src = h.data();
  const auto n = static_cast<std::size_t>(h.size());
  // Safe without the GIL: as in insert.
  py::gil_scoped_release release;
  return m.remove(r, src, n);
}

py::array_t<std::uint64_t> blocks(const CacheMirror& m, long long replica) {
  const std::size_t r = replica_index(m, replica);
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(m.size(r)));
  m.blocks(r, out.mutable_data());
  return out;
}

std::string repr(const CacheMirror& m) {
  std::ostringstream s;
  s << "CacheMirror(num_replicas=" << m.num_replicas() << ", distinct_blocks=" << m.distinct_blocks() << ")";
  return s.str();
}

}  // namespace

void register_mirror(py::module_& m) {
  py::class_<CacheMirror>(m, "CacheMirror", R"doc(
The router's estimate of the KV blocks each replica holds, with vLLM prefix-caching semantics.

Per replica an LRU set of block hashes (chained hashes, so a hash names its whole prefix) bounded
by a capacity in blocks. match() returns, for every replica in one pass, how many *leading* hashes
of a prompt it holds (a missing block ends the match). insert() marks a prompt's leading blocks
most recently used, its first block the most, so LRU evicts a prompt's tail before its head, as
vLLM does. remove()/clear() apply vLLM KV events; resize() applies a scraped cache size.

Replica indices are 0..num_replicas-1; remove_replica(i) shifts later indices down by one.
Hashes are uint64 arrays (or integer sequences; signed values are reinterpreted as two's
complement). Not thread-safe: match, insert and remove release the GIL, so the router must
serialise all access to one mirror (one event loop, or a lock).
)doc")
      .def(py::init(&make_mirror), py::arg("num_replicas"), py::arg("capacity_blocks"),
           "num_replicas replicas, each with room for capacity_blocks blocks (ValueError if negative).")
      .def("match", &match, py::arg("hashes"),
           "int64 array with one element per replica: the number of leading `hashes` the replica holds. "
           "Reads only; does not change recency.")
      .def("insert", &insert, py::arg("replica"), py::arg("hashes"),
           "Mark the leading min(len(hashes), capacity) hashes most recently used on `replica`, "
           "hashes[0] the most (they are touched in reverse order). Returns the number of blocks evicted.")
      .def("remove", &remove, py::arg("replica"), py::arg("hashes"),
           "Drop `hashes` from `replica` (absent ones are ignored); returns how many it held.")
      .def(
          "clear", [](CacheMirror& self, long long replica) { self.clear(replica_index(self, replica)); },
          py::arg("replica"), "Drop every block of `replica` (its capacity is kept).")
      .def(
          "resize",
          [](CacheMirror& self, long long replica, long long capacity) {
            const std::size_t r = replica_index(self, replica);
            return self.resize(r, non_negative(capacity, "capacity"));
          },
          py::arg("replica"), py::arg("capacity"),
          "Set `replica`'s capacity in blocks, evicting least recently used blocks down to it; returns "
          "how many were evicted.")
      .def(
          "add_replica",
          [](CacheMirror& self, long long capacity) { return self.add_replica(non_negative(capacity, "capacity")); },
          py::arg("capacity"), "Append an empty replica; returns its index (the old num_replicas).")
      .def(
          "remove_replica",
          [](CacheMirror& self, long long replica) { self.remove_replica(replica_index(self, replica)); },
          py::arg("replica"), "Remove `replica`; the replicas after it move down one index.")
      .def(
          "size", [](const CacheMirror& self, long long replica) { return self.size(replica_index(self, replica)); },
          py::arg("replica"), "Blocks `replica` holds.")
      .def(
          "capacity",
          [](const CacheMirror& self, long long replica) { return self.capacity(replica_index(self, replica)); },
          py::arg("replica"), "`replica`'s capacity in blocks.")
      .def(
          "contains",
          [](const CacheMirror& self, long long replica, std::uint64_t hash) {
            return self.contains(replica_index(self, replica), hash);
          },
          py::arg("replica"), py::arg("hash"), "Whether `replica` holds block `hash`.")
      .def("blocks", &blocks, py::arg("replica"),
           "uint64 array of `replica`'s block hashes, most recently used first (next to be evicted last).")
      .def_property_readonly("num_replicas", &CacheMirror::num_replicas)
      .def_property_readonly("distinct_blocks", &CacheMirror::distinct_blocks,
                             "Distinct block hashes held by at least one replica.")
      .def("__repr__", &repr);
}

}  // namespace pylb::bindings
