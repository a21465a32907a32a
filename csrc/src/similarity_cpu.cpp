// Batched cosine top-k on the CPU: tiled cblas_sgemm + per-query bounded min-heaps. The design
// comment (formula, order rule, tile size and why) is in include/pylb/similarity.hpp.
#include "pylb/similarity.hpp"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pylb {
namespace {

void check_sizes(std::size_t N, std::size_t D, std::size_t k) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  if (k > N) throw std::invalid_argument("k must be <= N, got k=" + std::to_string(k) + " N=" + std::to_string(N));
  if (N > kMaxSimilarityKeys) {
    throw std::invalid_argument("at most " + std::to_string(kMaxSimilarityKeys) + " keys are supported, got " + std::to_string(N));
  }
  if (D > static_cast<std::size_t>(INT_MAX)) throw std::invalid_argument("D must be <= INT_MAX, got " + std::to_string(D));
}

// The k best rank keys seen so far for one query: a min-heap (worst on top) in a caller's buffer.
class BoundedHeap {
 public:
  BoundedHeap(std::uint64_t* data, std::size_t capacity, std::size_t size) : h_(data), cap_(capacity), n_(size) {}
  std::size_t size() const noexcept { return n_; }

  // Folds scores s_j = dots[j] * inv_norm[j] of keys first_index + j, j in [0, count).
  void fold(const float* dots, const float* inv_norm, std::size_t count, std::uint32_t first_index) {
    std::size_t j = 0;
    for (; j < count && n_ < cap_; ++j) {
      h_[n_++] = rank_key(dots[j] * inv_norm[j], first_index + static_cast<std::uint32_t>(j));
      std::push_heap(h_, h_ + n_, std::greater<>());
    }
    if (j == count) return;
    std::uint64_t worst = h_[0];
    float threshold = rank_key_similarity(worst);  // NaN when the worst is NaN: then nothing is skipped
    for (; j < count; ++j) {
      const float s = dots[j] * inv_norm[j];
      // The common case, one compare: a score strictly below the worst's similarity can't get in
      // (rank_key is strictly increasing in s). Ties and NaN fall through to the exact key test.
      if (s < threshold) continue;
      const std::uint64_t key = rank_key(s, first_index + static_cast<std::uint32_t>(j));
      if (key <= worst) continue;
      std::pop_heap(h_, h_ + n_, std::greater<>());
      h_[n_ - 1] = key;
      std::push_heap(h_, h_ + n_, std::greater<>());
      worst = h_[0];
      threshold = rank_key_similarity(worst);
    }
  }

 private:
  std::uint64_t* h_;
  std::size_t cap_;
  std::size_t n_;
};

}  // namespace

void topk_cosine_cpu(const float* queries, const float* keys, std::size_t B, std::size_t N, std::size_t D,
                     std::size_t k, std::int64_t* out_index, float* out_similarity, std::size_t tile_keys,
                     bool keys_unit) {
  check_sizes(N, D, k);
  // Few queries: one sgemv per query and L2-sized key tile (no packing of the key tile, which
  // dominates an sgemm with so few rows, and small enough that OpenBLAS stays on this thread).
  const bool gemv = B <= kGemvMaxQueries && D > 0;
  if (tile_keys == 0) {
    tile_keys = gemv ? std::clamp<std::size_t>(kGemvTileBytes / (D * sizeof(float)), 64, kDefaultTileKeys) : kDefaultTileKeys;
  }
  tile_keys = std::min(tile_keys, N);
  if (B == 0) return;

  // 1. Unit-length queries (zero or non-finite norm -> factor 0, see detail::inverse_norm_from_sum).
  std::vector<float> qn(B * D);
  for (std::size_t b = 0; b < B; ++b) {
    const float* q = queries + b * D;
    const float inv = detail::inverse_norm(q, D);
    for (std::size_t d = 0; d < D; ++d) qn[b * D + d] = q[d] * inv;
  }

  const std::size_t qblock = std::min(B, kQueryBlock);
  std::vector<float> scores(qblock * tile_keys);
  std::vector<float> inv_norm(tile_keys, 1.0f);
  std::vector<std::uint64_t> heaps(B * k);
  std::vector<std::size_t> heap_sizes(B, 0);

  // 2. Key tiles: norms, GEMM, fold.
  for (std::size_t j0 = 0; j0 < N; j0 += tile_keys) {
    const std::size_t nt = std::min(tile_keys, N - j0);
    const float* kt = keys + j0 * D;
    if (!keys_unit) {
      for (std::size_t j = 0; j < nt; ++j) inv_norm[j] = detail::inverse_norm(kt + j * D, D);
    }
    for (std::size_t b0 = 0; b0 < B; b0 += qblock) {
      const std::size_t nb = std::min(qblock, B - b0);
      if (gemv) {
        // scores[r, 0:nt] = kt[0:nt, :] . qn[b0 + r, :]  (row-major nt x D times a D-vector)
        for (std::size_t r = 0; r < nb; ++r) {
          cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(nt), static_cast<int>(D), 1.0f, kt, static_cast<int>(D),
                      qn.data() + (b0 + r) * D, 1, 0.0f, scores.data() + r * nt, 1);
        }
      } else if (D == 0) {
        std::fill(scores.begin(), scores.begin() + static_cast<std::ptrdiff_t>(nb * nt), 0.0f);
      } else {
        // scores[nb, nt] = qn[b0:b0+nb, :] . kt[0:nt, :]^T  (row-major; leading dimensions D, D, nt)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nb), static_cast<int>(nt),
                    static_cast<int>(D), 1.0f, qn.data() + b0 * D, static_cast<int>(D), kt, static_cast<int>(D),
                    0.0f, scores.data(), static_cast<int>(nt));
      }
      for (std::size_t r = 0; r < nb; ++r) {
        const std::size_t b = b0 + r;
        BoundedHeap heap(heaps.data() + b * k, k, heap_sizes[b]);
        heap.fold(scores.data() + r * nt, inv_norm.data(), nt, static_cast<std::uint32_t>(j0));
        heap_sizes[b] = heap.size();
      }
    }
  }

  // 3. Best first, decoded.
  for (std::size_t b = 0; b < B; ++b) {
    std::uint64_t* h = heaps.data() + b * k;
    std::sort(h, h + k, std::greater<>());
    for (std::size_t t = 0; t < k; ++t) {
      out_index[b * k + t] = static_cast<std::int64_t>(rank_key_index(h[t]));
      out_similarity[b * k + t] = rank_key_similarity(h[t]);
    }
  }
}

#if !defined(PYLB_WITH_CUDA)
bool similarity_built_with_cuda() noexcept { return false; }
bool similarity_cuda_available() noexcept { return false; }
void topk_cosine_cuda(const float*, const float*, std::size_t, std::size_t, std::size_t, std::size_t, std::int64_t*,
                      float*, void*, int) {
  throw std::runtime_error("pylb was built without CUDA; rebuild with PYLB_CUDA=ON to use the GPU");
}
#endif

}  // namespace pylb
