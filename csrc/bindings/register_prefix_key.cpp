// Bindings for the adaptive prefix key table (include/pylb/prefix_key.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "bindings.hpp"
#include "hash_array.hpp"
#include "pylb/prefix_key.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {


std::size_t positive(long long value, const char* field) {
  if (value < 1) throw py::value_error(std::string(field) + " must be >= 1, got " + std::to_string(value));
  return static_cast<std::size_t>(value);
}

PrefixKeyTable make_table(long long window, double expand_share, double shrink_share, long long min_samples,
                          long long max_depth) {
  PrefixKeyParams p;
  p.window = positive(window, "window");
  p.expand_share = expand_share;
  p.shrink_share = shrink_share;
  p.min_samples = positive(min_samples, "min_samples");
  p.max_depth = positive(max_depth, "max_depth");
  return PrefixKeyTable(p);  // std::invalid_argument -> ValueError
}

std::uint64_t short_key_or_raise(std::size_t n, const std::optional<std::uint64_t>& short_key) {
  if (n == 0 && !short_key) {
    throw py::value_error(
        "boundary_hashes is empty (the prompt is shorter than one key block): pass short_key, the "
        "prompt's last block hash or a hash of the whole prompt");
  }
  return short_key.value_or(0);
}

py::tuple key_for(PrefixKeyTable& t, const py::handle& boundary_hashes, const std::optional<std::uint64_t>& short_key) {
  const HashArray h = as_hashes(boundary_hashes, "boundary_hashes");
  const auto n = static_cast<std::size_t>(h.size());
  const std::uint64_t sk = short_key_or_raise(n, short_key);
  // The GIL is kept: the call is sub-microsecond and mutates the table, which the router owns.
  const PrefixKey k = t.key_for(h.data(), n, sk);
  return py::make_tuple(k.key, k.depth);
}

py::tuple peek(const PrefixKeyTable& t, const py::handle& boundary_hashes, const std::optional<std::uint64_t>& short_key) {
  const HashArray h = as_hashes(boundary_hashes, "boundary_hashes");
  const auto n = static_cast<std::size_t>(h.size());
  const std::uint64_t sk = short_key_or_raise(n, short_key);
  const PrefixKey k = t.peek(h.data(), n, sk);
  return py::make_tuple(k.key, k.depth);
}

py::tuple key_if_recorded(const PrefixKeyTable& t, const py::handle& boundary_hashes, const std::optional<std::uint64_t>& short_key) {
  const HashArray h = as_hashes(boundary_hashes, "boundary_hashes");
  const auto n = static_cast<std::size_t>(h.size());
  const std::uint64_t sk = short_key_or_raise(n, short_key);
  const PrefixKey k = t.key_if_recorded(h.data(), n, sk);
  return py::make_tuple(k.key, k.depth);
}

py::array_t<std::int64_t> depth_counts(const PrefixKeyTable& t) {
  const auto& hist = t.depth_counts();
  py::array_t<std::int64_t> out(static_cast<py::ssize_t>(hist.size()));
  auto* dst = out.mutable_data();
  for (std::size_t i = 0; i < hist.size(); ++i) dst[i] = static_cast<std::int64_t>(hist[i]);
  return out;
}

std::string repr(const PrefixKeyTable& t) {
  const auto& p = t.params();
  std::ostringstream s;
  s << "PrefixKeyTable(window=" << p.window << ", expand_share=" << p.expand_share
    << ", shrink_share=" << p.shrink_share << ", min_samples=" << p.min_samples << ", max_depth=" << p.max_depth
    << "; fill=" << t.fill() << ", expanded=" << t.expanded_count() << ")";
  return s.str();
}

}  // namespace

void register_prefix_key(py::module_& m) {
  // The parameters' defaults are written once, in PrefixKeyParams; Python reads them from here.
  const PrefixKeyParams d{};
  py::dict defaults;
  defaults["window"] = d.window;
  defaults["expand_share"] = d.expand_share;
  defaults["shrink_share"] = d.shrink_share;
  defaults["min_samples"] = d.min_samples;
  defaults["max_depth"] = d.max_depth;
  m.attr("PREFIX_KEY_DEFAULTS") = defaults;

  py::class_<PrefixKeyTable>(m, "PrefixKeyTable", R"doc(
DualMap's adaptive prefix key (arXiv 2602.06502): a sliding window of recent requests decides how
many key blocks (512 tokens each by default) of a prompt form its routing key.

The key starts at depth 1 and goes one block deeper while the prefix at the current depth holds at
least `expand_share` of the window's requests; an expanded prefix shrinks back only once its share
falls below `shrink_share` (hysteresis). Shares are judged against at least `min_samples`
requests (while the window fills, 2 requests of a prefix expand it), and keys never go deeper than
`max_depth` blocks.

`boundary_hashes` are the chained hashes at key-block boundaries (pylb.native.block_hashes with the
key block size), so boundary_hashes[d-1] names the whole prefix of depth d and is the key at depth
d. Not thread-safe: one router owns one table.
)doc")
      .def(py::init(&make_table), py::arg("window") = d.window, py::arg("expand_share") = d.expand_share,
           py::arg("shrink_share") = d.shrink_share, py::arg("min_samples") = d.min_samples, py::arg("max_depth") = d.max_depth,
           "Raises ValueError naming the field unless window >= 1, 0 < shrink_share <= expand_share <= 1, "
           "min_samples >= 1, max_depth >= 1 and window * max_depth <= 2**24.")
      .def("key_for", &key_for, py::arg("boundary_hashes"), py::arg("short_key") = py::none(),
           R"doc(Record one request in the window and return its routing key as (key, depth).

boundary_hashes: uint64 array (or integer sequence) of the chained hashes at key-block boundaries.
The key is boundary_hashes[depth-1], 1 <= depth <= min(len, max_depth).
short_key: the key of a prompt shorter than one key block (boundary_hashes empty): pass the prompt's
last fine-grained block hash, or a hash of the whole prompt when it has no full block. Such a request
gets (short_key, 0); it takes a window slot but counts no prefix. short_key is ignored otherwise,
and omitting it with an empty boundary_hashes raises ValueError.)doc")
      .def("peek", &peek, py::arg("boundary_hashes"), py::arg("short_key") = py::none(),
           "The (key, depth) key_for would return with the window as it stands, without recording the "
           "request (its own count is not included). For what-if queries.")
      .def("key_if_recorded", &key_if_recorded, py::arg("boundary_hashes"), py::arg("short_key") = py::none(),
           "Exactly the (key, depth) key_for would return now, without recording the request: a router "
           "chooses with it and records with key_for once the choice stands (so choosing has no side "
           "effect, and a request chosen twice is counted once).")
      .def("count", &PrefixKeyTable::count, py::arg("prefix"),
           "Number of requests in the window that hold `prefix` (a boundary hash) at depth <= max_depth.")
      .def("is_expanded", &PrefixKeyTable::is_expanded, py::arg("prefix"),
           "Whether key walks go past `prefix` now (the expand/shrink rule applied to the current window).")
      .def("depth_counts", &depth_counts,
           "int64 array of length max_depth + 1: element d is the number of requests in the window "
           "whose key had depth d (d = 0: prompts shorter than one key block).")
      .def("reset", &PrefixKeyTable::reset, "Forget the window (parameters are kept).")
      .def_property_readonly("window", [](const PrefixKeyTable& t) { return t.params().window; })
      .def_property_readonly("expand_share", [](const PrefixKeyTable& t) { return t.params().expand_share; })
      .def_property_readonly("shrink_share", [](const PrefixKeyTable& t) { return t.params().shrink_share; })
      .def_property_readonly("min_samples", [](const PrefixKeyTable& t) { return t.params().min_samples; })
      .def_property_readonly("max_depth", [](const PrefixKeyTable& t) { return t.params().max_depth; })
      .def_property_readonly("fill", &PrefixKeyTable::fill, "Requests in the window (<= window).")
      .def_property_readonly("expanded_count", &PrefixKeyTable::expanded_count,
                             "Prefixes flagged expanded (flags are re-evaluated when a prefix's count changes "
                             "or a key walk passes it).")
      .def_property_readonly("tracked_prefixes", &PrefixKeyTable::tracked_prefixes,
                             "Distinct prefixes with a nonzero count in the window.")
      .def("__repr__", &repr);
}

}  // namespace pylb::bindings
