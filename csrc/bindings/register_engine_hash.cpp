// Bindings for engine-exact block hashes (include/pylb/engine_hash.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "bindings.hpp"
#include "pylb/engine_hash.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {

using TokenArray = py::array_t<std::uint32_t, py::array::c_style | py::array::forcecast>;

EngineHash parent_of(const py::object& parent) {
  EngineHash h{};
  if (parent.is_none()) return engine_none_hash("vllm-none-hash");
  if (!py::isinstance<py::bytes>(parent)) {
    throw py::type_error("parent must be a 32-byte bytes object (an engine block hash) or None");
  }
  const std::string s = parent.cast<std::string>();
  if (s.size() != 32) throw py::value_error("parent must be 32 bytes, got " + std::to_string(s.size()));
  std::memcpy(h.data(), s.data(), 32);
  return h;
}

py::object block_hashes(const py::handle& tokens, long long block_size, const py::object& parent, bool return_hashes) {
  if (block_size <= 0) throw py::value_error("block_size must be a positive integer, got " + std::to_string(block_size));
  if (py::isinstance<py::str>(tokens) || py::isinstance<py::bytes>(tokens)) {
    throw py::type_error("token_ids must be a 1-D uint32 array or a sequence of token ids, not text");
  }
  TokenArray ids = TokenArray::ensure(tokens);
  if (!ids || ids.ndim() != 1) throw py::type_error("token_ids must be a 1-D uint32 array or a sequence of token ids");
  const EngineHash start = parent_of(parent);
  const auto n = static_cast<std::size_t>(ids.size());
  const std::size_t bs = static_cast<std::size_t>(block_size);
  const std::size_t blocks = n / bs;
  py::array_t<std::uint64_t> keys(static_cast<py::ssize_t>(blocks));
  std::string full(return_hashes ? 32 * blocks : 0, '\0');
  std::uint64_t* kout = keys.mutable_data();
  auto* hout = return_hashes ? reinterpret_cast<std::uint8_t*>(full.data()) : nullptr;
  const std::uint32_t* src = ids.data();
  {
    // Safe without the GIL: reads the held token buffer and writes two fresh buffers only.
    py::gil_scoped_release release;
    engine_block_hashes(src, n, bs, start, kout, hout);
  }
  if (!return_hashes) return std::move(keys);
  return py::make_tuple(keys, py::bytes(full));
}

}  // namespace

void register_engine_hash(py::module_& m) {
  m.def(
      "engine_none_hash",
      [](const std::string& seed) {
        const EngineHash h = engine_none_hash(seed);
        return py::bytes(reinterpret_cast<const char*>(h.data()), h.size());
      },
      py::arg("seed") = "vllm-none-hash",
      "vLLM's NONE_HASH for sha256_cbor: SHA-256 of the canonical CBOR of the seed string "
      "(vLLM's default seed 'vllm-none-hash'; PYTHONHASHSEED in vLLM's environment replaces it).");
  m.def("engine_block_hashes", &block_hashes, py::arg("token_ids"), py::arg("block_size"), py::arg("parent") = py::none(),
        py::arg("return_hashes") = false,
        R"doc(vLLM's prefix-caching block hashes (--prefix-caching-hash-algo sha256_cbor) of the full blocks of
`token_ids`: h_i = SHA-256(CBOR([h_{i-1}, [tokens of block i], None])), h_{-1} = `parent` (32 bytes; None:
NONE_HASH of the default seed). Returns the uint64 keys (each hash's last 8 bytes, big-endian: what
vLLM's integer event hashes carry), and with return_hashes=True a tuple (keys, the 32-byte hashes
concatenated).)doc");
}

}  // namespace pylb::bindings
