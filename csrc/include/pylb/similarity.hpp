// Batched cosine top-k similarity (DESIGN.md §3), used by the semantic cache.
//
// What: for row-major float32 queries Q[B, D] and keys K[N, D], the k keys of highest cosine
// similarity to each query, with their similarities:
//     cos(q, x) = (q . x) / (|q| |x|),   and 0 when |q| = 0 or |x| = 0.
// Result order, per query: similarity descending, ties by smaller key index. NaN (a NaN or an
// infinity in a query or key) ranks below every number; -0 and +0 are the same similarity.
//
// How (CPU, similarity_cpu.cpp):
//   1. q' = q / |q| for every query (B x D, small; norms summed as in detail:: below).
//   2. Walk the keys in tiles of `tile_keys` rows. Per tile: 1/|x| for each key (same summation),
//      then one cblas_sgemm S = Q' . K_tile^T (up to 256 queries x tile_keys), then fold each score
//      s = S[b, j] / |x_j| into query b's bounded min-heap of its k best so far. A score that does not
//      beat the heap's worst costs one compare, so the fold is one pass over S while it is in cache.
//   3. Sort each heap, best first.
// Parameters: tile_keys defaults to 4096 (kDefaultTileKeys): a 256 x 4096 score tile is 4 MiB and
// the key tile at D = 384 is 6 MiB, so both stay in L2/L3 between the norm pass, the GEMM and the
// fold, while the GEMM is still wide enough to run at full speed (on a 2-core Xeon, tiles of
// 2k-16k keys were indistinguishable within run-to-run noise).
// Queries go in blocks of up to 256 (kQueryBlock) so the score tile stays bounded for any B.
// Up to kGemvMaxQueries queries skip the GEMM: per key tile of ~kGemvTileBytes (L2-sized) one
// cblas_sgemv per query. An sgemm with so few rows spends most of its time packing the key tile,
// and a small gemv stays on the calling thread (OpenBLAS threads only large ones), so a single
// lookup does not wake BLAS threads on a busy host. With keys_unit the caller promises unit-length
// keys (the semantic cache normalises at store time): the per-tile norm pass is skipped and the
// dot product is the similarity (a key that is not unit length then scores its plain dot product).
//
// How (CUDA, similarity_cuda.cu, only when built with PYLB_WITH_CUDA): the same steps on device:
// query normalisation and key inverse norms in kernels, cuBLAS sgemm per key tile, then an exact
// radix select of the k largest rank keys (below) per (query, chunk of 2048 scores), a second radix
// select over the chunks' survivors, a CUB segmented sort of the k winners, and a decode.
//
// The CPU and CUDA twins order results by the same 64-bit rank key (rank_key below), so their order
// rule is identical by construction; their similarities differ only by float rounding (OpenBLAS vs
// cuBLAS summation order), which can swap near-ties (|difference| ~ 1e-6).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYLB_HOST_DEVICE __host__ __device__
#else
#define PYLB_HOST_DEVICE
#endif

namespace pylb {

// Key indices must fit the rank key's 32-bit index field (with room for a "no key" value 0).
inline constexpr std::size_t kMaxSimilarityKeys = 0x7FFFFFFFu;
inline constexpr std::size_t kDefaultTileKeys = 4096;
inline constexpr std::size_t kQueryBlock = 256;
inline constexpr std::size_t kGemvMaxQueries = 4;
inline constexpr std::size_t kGemvTileBytes = 256 * 1024;

// The rank key of (similarity s, key index i): an unsigned 64-bit integer that is larger exactly
// when (s, i) comes first in the result order (s descending, then i ascending). High 32 bits: s's
// bits made monotone (every NaN mapped to the lowest value, -0 to +0); low 32 bits: ~i. Every valid
// key is > 0 (i <= kMaxSimilarityKeys), so 0 can pad candidate lists.
PYLB_HOST_DEVICE inline std::uint64_t rank_key(float s, std::uint32_t i) noexcept {
  std::uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(s);
#else
  std::memcpy(&bits, &s, sizeof bits);
#endif
  if (s != s) {
    bits = 0xFFFFFFFFu;  // a negative NaN: maps to 0 below
  } else if (s == 0.0f) {
    bits = 0u;  // -0 -> +0
  }
  const std::uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<std::uint64_t>(ordered) << 32) | static_cast<std::uint64_t>(0xFFFFFFFFu - i);
}

PYLB_HOST_DEVICE inline float rank_key_similarity(std::uint64_t key) noexcept {
  const auto ordered = static_cast<std::uint32_t>(key >> 32);
  const std::uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
  float s;
#if defined(__CUDA_ARCH__)
  s = __uint_as_float(bits);
#else
  std::memcpy(&s, &bits, sizeof s);
#endif
  return s;
}

PYLB_HOST_DEVICE inline std::uint32_t rank_key_index(std::uint64_t key) noexcept {
  return 0xFFFFFFFFu - static_cast<std::uint32_t>(key & 0xFFFFFFFFu);
}

namespace detail {

// Norms, computed the same way by both twins so that they agree bit for bit: 32 float lanes, lane l
// summing x[l]^2, x[l+32]^2, ... in order (no FMA), then the lanes added 0..31 in double.
inline constexpr std::size_t kNormLanes = 32;

// 1/|x| from the sum of squares; 0 for a zero vector, and also for NaN or infinite sums (so the
// similarity becomes 0 * dot: NaN when x holds a NaN or infinity, 0 for a zero vector).
PYLB_HOST_DEVICE inline float inverse_norm_from_sum(double sum_squares) noexcept {
  return sum_squares > 0.0 ? static_cast<float>(1.0 / sqrt(sum_squares)) : 0.0f;
}

#if !defined(__CUDA_ARCH__)
inline float inverse_norm(const float* x, std::size_t d) noexcept {
  float lane[kNormLanes] = {};
  std::size_t i = 0;
  for (; i + kNormLanes <= d; i += kNormLanes) {
    for (std::size_t l = 0; l < kNormLanes; ++l) lane[l] += x[i + l] * x[i + l];
  }
  for (std::size_t l = 0; i + l < d; ++l) lane[l] += x[i + l] * x[i + l];
  double total = 0.0;
  for (std::size_t l = 0; l < kNormLanes; ++l) total += static_cast<double>(lane[l]);
  return inverse_norm_from_sum(total);
}
#endif

}  // namespace detail

// Number of result columns for a request of k over n keys: min(k, n).
inline std::size_t topk_columns(std::size_t k, std::size_t n) noexcept { return k < n ? k : n; }

// CPU top-k. Preconditions (checked; std::invalid_argument otherwise): 1 <= k <= N <= kMaxSimilarityKeys,
// D <= INT_MAX. B may be 0; D may be 0 (every similarity is then 0). Writes out_index[B * k] and
// out_similarity[B * k], row-major. tile_keys = 0 takes the default (kDefaultTileKeys, or an
// L2-sized tile on the gemv path). keys_unit: skip the key norms (see above). Thread-safe (no
// shared state); uses the BLAS library's own threads for the GEMM.
void topk_cosine_cpu(const float* queries, const float* keys, std::size_t B, std::size_t N, std::size_t D,
                     std::size_t k, std::int64_t* out_index, float* out_similarity, std::size_t tile_keys = 0,
                     bool keys_unit = false);

// True when this library was built with the CUDA kernels (PYLB_WITH_CUDA).
bool similarity_built_with_cuda() noexcept;

// True when built with CUDA and the runtime sees at least one device; never throws, also when no
// driver is installed.
bool similarity_cuda_available() noexcept;

// CUDA top-k on device pointers, enqueued on `stream` (a cudaStream_t; nullptr = legacy default)
// of device `device` (-1 = the calling thread's current device); returns once the work is queued,
// so the outputs are ready in stream order. Same preconditions and results as topk_cosine_cpu, up to
// float rounding. Throws std::invalid_argument for bad sizes, std::runtime_error for CUDA/cuBLAS
// errors and when built without CUDA.
void topk_cosine_cuda(const float* queries, const float* keys, std::size_t B, std::size_t N, std::size_t D,
                      std::size_t k, std::int64_t* out_index, float* out_similarity, void* stream, int device = -1);

}  // namespace pylb
