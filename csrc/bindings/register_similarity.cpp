// Bindings for batched cosine top-k similarity (include/pylb/similarity.hpp). The user-facing
// function with device dispatch and CuPy support is pylb.native.topk_similarity.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.hpp"
#include "pylb/similarity.hpp"

namespace py = pybind11;

namespace pylb::bindings {
namespace {

using FloatMatrix = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) { return py::str(a.attr("shape")).cast<std::string>(); }

// `obj` as a C-contiguous float32 2-D array; copies only to make it contiguous, never to convert.
FloatMatrix as_float_matrix(const py::handle& obj, const char* what) {
  py::array arr = py::array::ensure(obj);
  if (!arr) {
    throw py::type_error(std::string(what) + " must be a float32 numpy array, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  if (!py::array_t<float>::check_(arr)) {  // float32 in native byte order, nothing else
    throw py::type_error(std::string(what) + " must have dtype float32, got " + py::str(arr.dtype()).cast<std::string>() +
                         " (convert explicitly, e.g. " + what + ".astype(numpy.float32))");
  }
  if (arr.ndim() != 2) {
    throw py::value_error(std::string(what) + " must be 2-D [rows, D], got shape " + shape_of(arr));
  }
  return FloatMatrix::ensure(arr);
}

std::size_t checked_k(long long k) {
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  return static_cast<std::size_t>(k);
}

py::tuple topk_similarity_cpu(const py::handle& queries, const py::handle& keys, long long k, bool keys_unit) {
  const std::size_t kk = checked_k(k);
  const FloatMatrix q = as_float_matrix(queries, "queries");
  const FloatMatrix x = as_float_matrix(keys, "keys");
  if (q.shape(1) != x.shape(1)) {
    throw py::value_error("queries and keys must have the same D (number of columns), got queries shape " + shape_of(q) +
                          " and keys shape " + shape_of(x));
  }
  const auto B = static_cast<std::size_t>(q.shape(0));
  const auto N = static_cast<std::size_t>(x.shape(0));
  const auto D = static_cast<std::size_t>(q.shape(1));
  const std::size_t cols = topk_columns(kk, N);
  py::array_t<std::int64_t> index({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(cols)});
  py::array_t<float> similarity({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(cols)});
  if (B > 0 && cols > 0) {
    const float* qp = q.data();
    const float* xp = x.data();
    std::int64_t* ip = index.mutable_data();
    float* sp = similarity.mutable_data();
    // Safe without the GIL: only the raw buffers of q, x (contiguous arrays held by this frame) and
    // of the two fresh output arrays are touched, and no Python object. Errors surface as C++
    // exceptions, rethrown once the GIL is back.
    py::gil_scoped_release release;
    topk_cosine_cpu(qp, xp, B, N, D, cols, ip, sp, 0, keys_unit);
  }
  return py::make_tuple(index, similarity);
}

void topk_similarity_cuda_ptr(std::uintptr_t queries, std::uintptr_t keys, long long B, long long N, long long D,
                              long long k, std::uintptr_t out_index, std::uintptr_t out_similarity,
                              std::uintptr_t stream, int device) {
  if (B < 0 || N < 0 || D < 0) {
    throw py::value_error("B, N and D must be >= 0, got B=" + std::to_string(B) + " N=" + std::to_string(N) +
                          " D=" + std::to_string(D));
  }
  const std::size_t kk = checked_k(k);
  if (B > 0 && (queries == 0 || keys == 0 || out_index == 0 || out_similarity == 0)) {
    throw py::value_error("device pointers must be non-null");
  }
  // Safe without the GIL: only integers and device pointers are used; the caller keeps the arrays
  // alive, and any later use of them is ordered after this work on `stream`.
  py::gil_scoped_release release;
  topk_cosine_cuda(reinterpret_cast<const float*>(queries), reinterpret_cast<const float*>(keys),
                   static_cast<std::size_t>(B), static_cast<std::size_t>(N), static_cast<std::size_t>(D), kk,
                   reinterpret_cast<std::int64_t*>(out_index), reinterpret_cast<float*>(out_similarity),
                   reinterpret_cast<void*>(stream), device);
}

}  // namespace

void register_similarity(py::module_& m) {
  m.def("topk_similarity_cpu", &topk_similarity_cpu, py::arg("queries"), py::arg("keys"), py::arg("k"), py::arg("keys_unit") = false,
        "Cosine top-k on the CPU. queries: float32 [B, D], keys: float32 [N, D] (C-contiguous copies are made\n"
        "of other layouts; other dtypes raise TypeError), k >= 1 (clamped to N). Returns (indices int64 [B, min(k, N)],\n"
        "similarities float32 [B, min(k, N)]), per row by similarity descending, ties by smaller index; a zero\n"
        "vector has similarity 0 to everything; NaN similarities (NaN/inf inputs) rank last. keys_unit=True: the\n"
        "keys are unit length (not checked): their norms are not computed. Releases the GIL.");
  m.def("_topk_similarity_cuda_ptr", &topk_similarity_cuda_ptr, py::arg("queries_ptr"), py::arg("keys_ptr"),
        py::arg("B"), py::arg("N"), py::arg("D"), py::arg("k"), py::arg("out_index_ptr"), py::arg("out_similarity_ptr"),
        py::arg("stream_ptr") = 0, py::arg("device") = -1,
        "Low-level CUDA top-k on device pointers (ints): C-contiguous float32 queries [B, D] and keys [N, D], outputs\n"
        "int64 [B, k] and float32 [B, k] with 1 <= k <= N. Enqueued on stream_ptr (0 = legacy default stream) of\n"
        "`device` (-1 = current) and returns without synchronising. Same order rule as topk_similarity_cpu.\n"
        "RuntimeError when built without CUDA or on CUDA errors. Use pylb.native.topk_similarity instead.");
  m.def("built_with_cuda", &similarity_built_with_cuda, "True when pylb._core was built with the CUDA kernels (PYLB_CUDA=ON).");
  m.def("cuda_available", &similarity_cuda_available,
        "True when built with CUDA and a CUDA device is usable now (False, never an error, without a driver or device).");
}

}  // namespace pylb::bindings
