// Batched cosine top-k on CUDA: the GPU twin of similarity_cpu.cpp, built only with PYLB_CUDA=ON.
// Formula, order rule and the shared rank key are in include/pylb/similarity.hpp. GPU specifics:
//
//   1. inverse_norms / normalize_rows: one warp per row, the same 32-lane float summation as the
//      CPU's detail::inverse_norm (explicit __fmul_rn/__fadd_rn: no FMA), so norms and the unit
//      queries q' are bit-identical to the CPU twin's.
//   2. Per block of queries (bounded so that the score and candidate buffers stay <= 256 MiB each)
//      and per tile of keys (the whole of N when it fits): cuBLAS sgemm S = Q' . K_tile^T in plain
//      FP32 (CUBLAS_DEFAULT_MATH: no TF32).
//   3. chunk_select: one 256-thread block per (query, chunk of kChunk = 2048 scores). It builds the
//      chunk's rank keys rank_key(S[b, j] * (1/|x_j|), j) in shared memory and finds its k best
//      exactly by MSB radix select (8 passes of 8 bits over the 64-bit keys; keys are distinct since
//      indices are), then writes them as the chunk's candidates (padded with key 0, which ranks
//      below every valid key). Many blocks keep the GPU busy even for B = 1.
//   4. final_select: one block per query, the same radix select over its chunks' candidates.
//   5. CUB DeviceSegmentedSort sorts each query's k winners descending; decode writes index and
//      similarity (the similarity is recovered exactly from the key).
// Everything is enqueued on the caller's stream; workspace comes from cudaMallocAsync on that
// stream and is freed in stream order, so the call returns without synchronising.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cub/device/device_segmented_sort.cuh>
#include <stdexcept>
#include <string>
#include <vector>

#include "pylb/similarity.hpp"

namespace pylb {
namespace {

constexpr unsigned kThreads = 256;           // threads per block in every kernel
constexpr unsigned kWarp = 32;
constexpr std::size_t kChunk = 2048;         // scores per chunk_select block (16 KiB of keys in shared memory)
constexpr std::size_t kBufferBytes = 256u << 20;  // bound for the score tile and for the candidates
constexpr std::size_t kMaxGridY = 65535;

static_assert(detail::kNormLanes == kWarp, "the CPU norm lanes must match the warp width");

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("pylb CUDA similarity: ") + what + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
  }
}

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("pylb CUDA similarity: ") + what + ": " + cublasGetStatusString(s));
  }
}

// ---- kernels ---------------------------------------------------------------------------------

// 1/|row| with the CPU twin's lane structure; every lane of the warp returns the same value.
__device__ float warp_inverse_norm(const float* row, std::size_t d, unsigned lane) {
  float acc = 0.0f;
  for (std::size_t i = lane; i < d; i += kWarp) acc = __fadd_rn(acc, __fmul_rn(row[i], row[i]));
  double total = 0.0;
  for (unsigned l = 0; l < kWarp; ++l) total += static_cast<double>(__shfl_sync(0xFFFFFFFFu, acc, static_cast<int>(l)));
  return detail::inverse_norm_from_sum(total);
}

__global__ void inverse_norms_kernel(const float* x, std::size_t rows, std::size_t d, float* inv_out) {
  const std::size_t row = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const unsigned lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // uniform per warp
  const float inv = warp_inverse_norm(x + row * d, d, lane);
  if (lane == 0) inv_out[row] = inv;
}

__global__ void normalize_rows_kernel(const float* x, std::size_t rows, std::size_t d, float* out) {
  const std::size_t row = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const unsigned lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const float inv = warp_inverse_norm(x + row * d, d, lane);
  for (std::size_t i = lane; i < d; i += kWarp) out[row * d + i] = __fmul_rn(x[row * d + i], inv);
}

struct SelectShared {
  unsigned int hist[256];
  std::uint64_t prefix;
  unsigned int remaining;
  unsigned int count;
};

// The exact k-th largest of the L distinct keys get(0..L) (1 <= k <= L), by MSB radix select:
// per 8-bit digit, a histogram of the keys that still match the chosen prefix, then the digit
// whose bucket holds the remaining k-th largest. Called by all threads of the block.
template <class GetKey>
__device__ std::uint64_t block_kth_largest(GetKey get, unsigned L, unsigned k, SelectShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.remaining = k;
  }
  std::uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    const std::uint64_t prefix = sh.prefix;
    for (unsigned i = threadIdx.x; i < L; i += blockDim.x) {
      const std::uint64_t key = get(i);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned cum = 0;
      unsigned digit = 255;
      for (; digit > 0; --digit) {
        if (cum + sh.hist[digit] >= sh.remaining) break;
        cum += sh.hist[digit];
      }
      sh.remaining -= cum;
      sh.prefix = prefix | (static_cast<std::uint64_t>(digit) << shift);
    }
    mask |= static_cast<std::uint64_t>(0xFFu) << shift;
    __syncthreads();
  }
  return sh.prefix;
}

// Writes the keys >= kth (exactly k of them, in no particular order) to out.
template <class GetKey>
__device__ void block_gather(GetKey get, unsigned L, std::uint64_t kth, std::uint64_t* out, SelectShared& sh) {
  if (threadIdx.x == 0) sh.count = 0;
  __syncthreads();
  for (unsigned i = threadIdx.x; i < L; i += blockDim.x) {
    const std::uint64_t key = get(i);
    if (key >= kth) out[atomicAdd(&sh.count, 1u)] = key;
  }
}

struct SharedKeys {
  const std::uint64_t* keys;
  __device__ std::uint64_t operator()(unsigned i) const { return keys[i]; }
};

// grid (chunks in this tile, queries in this block). Scores S[row, tile_first + j] for j in the
// chunk -> the chunk's k_chunk best rank keys at cand[row * cand_stride + chunk_id * k_chunk].
__global__ void chunk_select_kernel(const float* scores, std::size_t tile_len, const float* inv_norm,
                                    std::uint32_t tile_first, unsigned k_chunk, std::uint64_t* cand,
                                    std::size_t cand_stride, std::size_t first_chunk_id) {
  __shared__ std::uint64_t keys[kChunk];
  __shared__ SelectShared sh;
  const std::size_t row = blockIdx.y;
  const std::size_t c0 = static_cast<std::size_t>(blockIdx.x) * kChunk;
  const auto L = static_cast<unsigned>(tile_len - c0 < kChunk ? tile_len - c0 : kChunk);
  const float* srow = scores + row * tile_len + c0;
  for (unsigned i = threadIdx.x; i < L; i += blockDim.x) {
    const std::uint32_t j = static_cast<std::uint32_t>(c0) + i;
    keys[i] = rank_key(__fmul_rn(srow[i], inv_norm[j]), tile_first + j);
  }
  __syncthreads();
  std::uint64_t* out = cand + row * cand_stride + (first_chunk_id + blockIdx.x) * k_chunk;
  const unsigned take = k_chunk < L ? k_chunk : L;
  for (unsigned i = take + threadIdx.x; i < k_chunk; i += blockDim.x) out[i] = 0;  // padding ranks last
  if (take == L) {
    for (unsigned i = threadIdx.x; i < L; i += blockDim.x) out[i] = keys[i];
    return;
  }
  const SharedKeys get{keys};
  const std::uint64_t kth = block_kth_largest(get, L, take, sh);
  block_gather(get, L, kth, out, sh);
}

struct GlobalKeys {
  const std::uint64_t* keys;
  __device__ std::uint64_t operator()(unsigned i) const { return keys[i]; }
};

// grid (queries in this block). The k best of each row's candidates -> sel[row * k].
__global__ void final_select_kernel(const std::uint64_t* cand, std::size_t cand_stride, unsigned k,
                                    std::uint64_t* sel) {
  __shared__ SelectShared sh;
  const std::size_t row = blockIdx.x;
  const GlobalKeys get{cand + row * cand_stride};
  const auto L = static_cast<unsigned>(cand_stride);
  const std::uint64_t kth = block_kth_largest(get, L, k, sh);
  block_gather(get, L, kth, sel + row * k, sh);
}

__global__ void segment_offsets_kernel(int* offsets, std::size_t segments, unsigned k) {
  const std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= segments) offsets[i] = static_cast<int>(i * k);
}

__global__ void decode_kernel(const std::uint64_t* sorted, std::size_t count, std::int64_t* out_index,
                              float* out_similarity) {
  const std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out_index[i] = static_cast<std::int64_t>(rank_key_index(sorted[i]));
  out_similarity[i] = rank_key_similarity(sorted[i]);
}

// ---- host side -------------------------------------------------------------------------------

unsigned blocks_for(std::size_t threads_needed) {
  return static_cast<unsigned>((threads_needed + kThreads - 1) / kThreads);
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Stream-ordered device buffer: cudaMallocAsync on creation, cudaFreeAsync on destruction.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(std::size_t count, cudaStream_t stream, const char* what) : stream_(stream) {
    if (count > 0) check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), count * sizeof(T), stream), what);
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const noexcept { return ptr_; }

 private:
  T* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Makes `device` current for the scope and restores the caller's device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device >= 0 && device != previous_) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// One cuBLAS handle per (thread, device), created on first use. Thread-local so that calls from
// several threads (the GIL is released) never share one; never destroyed, because destroying
// handles during process exit can run after the CUDA driver has shut down.
cublasHandle_t cublas_handle() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  thread_local std::vector<cublasHandle_t> handles;
  if (handles.size() <= static_cast<std::size_t>(device)) handles.resize(static_cast<std::size_t>(device) + 1, nullptr);
  cublasHandle_t& h = handles[static_cast<std::size_t>(device)];
  if (h == nullptr) {
    check_cublas(cublasCreate(&h), "cublasCreate");
    check_cublas(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  }
  return h;
}

void check_sizes(std::size_t N, std::size_t D, std::size_t k) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  if (k > N) throw std::invalid_argument("k must be <= N, got k=" + std::to_string(k) + " N=" + std::to_string(N));
  if (N > kMaxSimilarityKeys) {
    throw std::invalid_argument("at most " + std::to_string(kMaxSimilarityKeys) + " keys are supported, got " + std::to_string(N));
  }
  if (D > static_cast<std::size_t>(INT_MAX)) throw std::invalid_argument("D must be <= INT_MAX, got " + std::to_string(D));
}

}  // namespace

bool similarity_built_with_cuda() noexcept { return true; }

bool similarity_cuda_available() noexcept {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);  // fails cleanly (no driver / no device) without a GPU
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so later runtime calls don't report it
    return false;
  }
  return count > 0;
}

void topk_cosine_cuda(const float* queries, const float* keys, std::size_t B, std::size_t N, std::size_t D,
                      std::size_t k, std::int64_t* out_index, float* out_similarity, void* stream_ptr, int device) {
  check_sizes(N, D, k);
  if (B == 0) return;
  DeviceScope scope(device);
  auto stream = static_cast<cudaStream_t>(stream_ptr);

  // Sizes: k_chunk candidates per chunk; query blocks bounded by the candidate and score budgets.
  const std::size_t total_chunks = (N + kChunk - 1) / kChunk;
  const std::size_t k_chunk = std::min(k, kChunk);
  const std::size_t cand_stride = total_chunks * k_chunk;
  if (cand_stride > UINT_MAX || k > static_cast<std::size_t>(INT_MAX)) {
    throw std::invalid_argument("k and N too large for the CUDA kernels");
  }
  std::size_t qblock = std::max<std::size_t>(1, kBufferBytes / (cand_stride * sizeof(std::uint64_t)));
  qblock = std::min({qblock, B, kMaxGridY, static_cast<std::size_t>(INT_MAX) / k});
  std::size_t tile = N;
  if (qblock * N * sizeof(float) > kBufferBytes) {
    tile = std::max<std::size_t>(1, kBufferBytes / (qblock * sizeof(float)) / kChunk) * kChunk;
    tile = std::min(tile, N);
  }
  if (tile > static_cast<std::size_t>(INT_MAX)) tile = (static_cast<std::size_t>(INT_MAX) / kChunk) * kChunk;

  cublasHandle_t handle = cublas_handle();
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");

  DeviceBuffer<float> qn(B * D, stream, "cudaMallocAsync(unit queries)");
  DeviceBuffer<float> inv_norm(N, stream, "cudaMallocAsync(key norms)");
  DeviceBuffer<float> scores(qblock * tile, stream, "cudaMallocAsync(scores)");
  DeviceBuffer<std::uint64_t> cand(qblock * cand_stride, stream, "cudaMallocAsync(candidates)");
  DeviceBuffer<std::uint64_t> sel(qblock * k, stream, "cudaMallocAsync(selected)");
  DeviceBuffer<std::uint64_t> sorted(qblock * k, stream, "cudaMallocAsync(sorted)");
  DeviceBuffer<int> offsets(qblock + 1, stream, "cudaMallocAsync(offsets)");

  std::size_t temp_bytes = 0;
  for (std::size_t nb : {qblock, B % qblock}) {
    if (nb == 0) continue;
    std::size_t bytes = 0;
    check_cuda(cub::DeviceSegmentedSort::SortKeysDescending(nullptr, bytes, sel.get(), sorted.get(),
                                                            static_cast<std::int64_t>(nb * k),
                                                            static_cast<std::int64_t>(nb), offsets.get(),
                                                            offsets.get() + 1, stream),
               "cub::DeviceSegmentedSort (size query)");
    temp_bytes = std::max(temp_bytes, bytes);
  }
  DeviceBuffer<unsigned char> temp(temp_bytes, stream, "cudaMallocAsync(sort workspace)");

  const unsigned rows_per_block = kThreads / kWarp;
  if (D > 0) {
    normalize_rows_kernel<<<static_cast<unsigned>((B + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(
        queries, B, D, qn.get());
    check_launch("normalize_rows_kernel");
  }
  inverse_norms_kernel<<<static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(
      keys, N, D, inv_norm.get());
  check_launch("inverse_norms_kernel");

  const float one = 1.0f;
  const float zero = 0.0f;
  for (std::size_t b0 = 0; b0 < B; b0 += qblock) {
    const std::size_t nb = std::min(qblock, B - b0);
    for (std::size_t j0 = 0; j0 < N; j0 += tile) {
      const std::size_t nt = std::min(tile, N - j0);
      if (D == 0) {
        check_cuda(cudaMemsetAsync(scores.get(), 0, nb * nt * sizeof(float), stream), "cudaMemsetAsync(scores)");
      } else {
        // Column-major view: C (nt x nb, ld nt) = A^T (A = K tile as D x nt, ld D) . B (Q' as D x nb,
        // ld D); C read row-major is scores[nb, nt] = Q' . K_tile^T.
        check_cublas(cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(nt), static_cast<int>(nb),
                                 static_cast<int>(D), &one, keys + j0 * D, static_cast<int>(D), qn.get() + b0 * D,
                                 static_cast<int>(D), &zero, scores.get(), static_cast<int>(nt)),
                     "cublasSgemm");
      }
      const dim3 grid(static_cast<unsigned>((nt + kChunk - 1) / kChunk), static_cast<unsigned>(nb));
      chunk_select_kernel<<<grid, kThreads, 0, stream>>>(scores.get(), nt, inv_norm.get() + j0,
                                                         static_cast<std::uint32_t>(j0), static_cast<unsigned>(k_chunk),
                                                         cand.get(), cand_stride, j0 / kChunk);
      check_launch("chunk_select_kernel");
    }
    final_select_kernel<<<static_cast<unsigned>(nb), kThreads, 0, stream>>>(cand.get(), cand_stride,
                                                                           static_cast<unsigned>(k), sel.get());
    check_launch("final_select_kernel");
    segment_offsets_kernel<<<blocks_for(nb + 1), kThreads, 0, stream>>>(offsets.get(), nb, static_cast<unsigned>(k));
    check_launch("segment_offsets_kernel");
    std::size_t bytes = temp_bytes;
    check_cuda(cub::DeviceSegmentedSort::SortKeysDescending(temp.get(), bytes, sel.get(), sorted.get(),
                                                            static_cast<std::int64_t>(nb * k),
                                                            static_cast<std::int64_t>(nb), offsets.get(),
                                                            offsets.get() + 1, stream),
               "cub::DeviceSegmentedSort");
    decode_kernel<<<blocks_for(nb * k), kThreads, 0, stream>>>(sorted.get(), nb * k, out_index + b0 * k,
                                                               out_similarity + b0 * k);
    check_launch("decode_kernel");
  }
}

}  // namespace pylb
