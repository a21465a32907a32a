// Bindings for chained block hashing (include/pylb/block_hash.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "pylb/block_hash.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {

// A prompt seen as raw bytes: either a 1-byte buffer (bytes, bytearray, memoryview) or a
// C-contiguous uint32 array of token ids, whose blocks are then counted in tokens.
struct PromptBytes {
  py::buffer_info info;
  const std::uint8_t* data = nullptr;
  std::size_t len = 0;
  std::size_t unit = 1;  // bytes per element: 1 for bytes, 4 for uint32 token ids
};

PromptBytes view_prompt(const py::handle& obj, const char* what) {
  if (py::isinstance<py::str>(obj)) {
    throw py::type_error(std::string(what) + " must be bytes or a uint32 array of token ids, not str: encode text first (text.encode('utf-8'))");
  }
  if (!PyObject_CheckBuffer(obj.ptr())) {
    throw py::type_error(std::string(what) + " must be bytes or a uint32 array of token ids, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  PromptBytes p{py::reinterpret_borrow<py::buffer>(obj).request(), nullptr, 0, 1};
  const auto& fmt = p.info.format;
  const bool is_bytes = p.info.itemsize == 1 && (fmt == "B" || fmt == "b" || fmt == "c");
  const bool is_u32 = p.info.itemsize == 4 && (fmt == "I" || fmt == "=I" || fmt == "<I" || fmt == "L" || fmt == "=L");
  if (!is_bytes && !is_u32) {
    throw py::type_error(std::string(what) + " must hold bytes or uint32 token ids, got buffer format '" + fmt +
                         "' with item size " + std::to_string(p.info.itemsize));
  }
  if (p.info.ndim != 1) {
    throw py::value_error(std::string(what) + " must be one-dimensional, got " + std::to_string(p.info.ndim) + " dimensions");
  }
  if (p.info.shape[0] > 1 && p.info.strides[0] != p.info.itemsize) {
    throw py::value_error(std::string(what) + " must be contiguous (use numpy.ascontiguousarray)");
  }
  p.unit = static_cast<std::size_t>(p.info.itemsize);
  p.data = static_cast<const std::uint8_t*>(p.info.ptr);
  p.len = static_cast<std::size_t>(p.info.shape[0]) * p.unit;
  return p;
}

std::size_t checked_block_size(long long block_size) {
  if (block_size <= 0) {
    throw py::value_error("block_size must be a positive integer, got " + std::to_string(block_size));
  }
  return static_cast<std::size_t>(block_size);
}

py::array_t<std::uint64_t> block_hashes(const py::handle& data, long long block_size, std::uint64_t seed) {
  const std::size_t block = checked_block_size(block_size);
  PromptBytes p = view_prompt(data, "data");
  const std::size_t block_bytes = block * p.unit;
  const std::size_t n = full_block_count(p.len, block_bytes);
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(n));
  std::uint64_t* dst = out.mutable_data();
  {
    // Safe without the GIL: we touch only the prompt's buffer (held by p.info) and the fresh
    // output array, and no Python object.
    py::gil_scoped_release release;
    chained_block_hashes(p.data, p.len, block_bytes, seed, dst);
  }
  return out;
}

py::list block_hashes_batch(const py::sequence& prompts, long long block_size, std::uint64_t seed) {
  const std::size_t block = checked_block_size(block_size);
  std::vector<PromptBytes> views;
  views.reserve(prompts.size());
  std::vector<std::size_t> offsets{0};
  offsets.reserve(prompts.size() + 1);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const std::string what = "prompts[" + std::to_string(i) + "]";
    views.push_back(view_prompt(prompts[i], what.c_str()));
    const auto& v = views.back();
    offsets.push_back(offsets.back() + full_block_count(v.len, block * v.unit));
  }
  py::array_t<std::uint64_t> flat(static_cast<py::ssize_t>(offsets.back()));
  std::uint64_t* dst = flat.mutable_data();
  std::vector<ChainJob> jobs;
  jobs.reserve(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    jobs.push_back(ChainJob{views[i].data, views[i].len, block * views[i].unit, dst + offsets[i]});
  }
  {
    // Safe without the GIL: the prompt buffers stay held by `views` and only plain memory is touched.
    py::gil_scoped_release release;
    chained_block_hashes_many(jobs.data(), jobs.size(), seed);
  }
  py::list result(views.size());
  py::object slicer = flat.attr("__getitem__");
  for (std::size_t i = 0; i < views.size(); ++i) {
    result[i] = slicer(py::slice(static_cast<py::ssize_t>(offsets[i]), static_cast<py::ssize_t>(offsets[i + 1]), 1));
  }
  return result;
}

std::uint64_t xxh3_64_oneshot(const py::handle& data, std::uint64_t seed) {
  PromptBytes p = view_prompt(data, "data");
  py::gil_scoped_release release;  // only the held buffer is read
  return xxh3_64(p.data, p.len, seed);
}

}  // namespace

void register_hashing(py::module_& m) {
  m.def("block_hashes", &block_hashes, py::arg("data"), py::arg("block_size"), py::arg("seed") = 0,
        "Chained XXH3-64 hashes, one per full block of `data` (bytes, or uint32 token ids with block_size in tokens).");
  m.def("block_hashes_batch", &block_hashes_batch, py::arg("prompts"), py::arg("block_size"), py::arg("seed") = 0,
        "block_hashes over many prompts in one call; returns one uint64 array per prompt.");
  m.def("xxh3_64", &xxh3_64_oneshot, py::arg("data"), py::arg("seed") = 0,
        "One-shot XXH3-64 of a whole buffer.");
}

}  // namespace pylb::bindings
