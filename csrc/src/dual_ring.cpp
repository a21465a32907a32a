// Dual consistent-hash ring: two independent rings over the same replicas (DESIGN.md §3).
//
// What it does. DualMap (arXiv 2602.06502) gives every request exactly two candidate replicas,
// the owners of its prefix key on two independent consistent-hash rings; the router then picks
// one by cache affinity and predicted TTFT, and can migrate a queued request to the other. The
// ring is built once per membership list, immutable, and swapped whole on a change (as Envoy's
// ring_hash_lb does), so lookups are const, lock-free and safe from any thread.
//
// Formulas (r = ring 0 or 1, XXH3 = XXH3_64bits_withSeed from the system xxHash):
//   points     replica i gets c_i = max(1, round(vnodes * w_i / mean(w))) points per ring, at
//                  pos_r(i, v) = XXH3(utf8(name_i) || le32(v), seed = S_r),  v = 0 .. c_i - 1
//              (as Envoy's ring_hash_lb hashes "<host>_<i>"). Placement is a pure function of
//              the names and weights, so router processes agree without talking; ties of
//              equal positions are broken by name, so the order of the list does not matter.
//   key probes the key (already a 64-bit hash) is remixed per ring and per probe:
//                  q_{r,p}(key) = XXH3(le64(key), seed = K_r + p),  p = 0 .. P - 1
//              Different seeds per ring make the two rings' views of a key independent.
//   owner      succ(x) = first point with pos >= x (wrapping past 2^64 to the first point);
//              d_p = pos[succ(q_p)] - q_p (mod 2^64). The key goes to the point succ(q_p*)
//              with p* = argmin_p d_p (lowest p on a tie); owner_r(key) = that point's replica.
//   candidates a = owner_0(key). b = owner_1(key); if b == a (and >= 2 replicas), b = owner of
//              the next point clockwise on ring 1, from the chosen point, of another replica.
//
// Multi-probe (Appleton & O'Reilly 2015, "Multi-probe consistent hashing", arXiv:1505.00062).
// With one probe, a replica's share is the sum of the arcs before its V points; arcs are about
// exponential, so the share's relative standard deviation is about 1/sqrt(V) = 6.25 % at V =
// 256, and "no replica above 1.15 x fair share on either ring" fails for about 1 in 4 sets of
// 16 replicas (measured: 42 of 150). Taking the nearest of P probes evens out the arcs: a point
// whose arc is x mean arcs long gets roughly 1 - exp(-P x) mean shares instead of x, so long
// arcs stop collecting extra keys. Share spread (relative standard deviation, exact integral
// over random rings, V = 256, confirmed by lookups): 5.9 % (P=1), 3.5 % (2), 2.7 % (3),
// 2.3 % (4), 2.0 % (5), 1.5 % (8). P = 4 puts 1.15 x fair at about 6.5 standard deviations
// whatever the replica count, for 8 lookups per candidate pair; beyond it each doubling of the
// lookups buys only a factor of about 1.5 in spread.
// Multi-probe keeps perfect consistency: adding a replica only adds points, which can only
// shorten some d_p, so a key either keeps its point or moves to a new one (onto the added
// replica); removing one only lengthens the d_p of probes that landed on its points, so only
// its keys move.
//
// Lookups are O(1): a bucket table indexed by the top bits of the position, with 2^bits >= 2 x
// points (under half a point per bucket on average), gives the first point of each bucket, and
// a short, mostly branch-free scan finds the successor. A next_other table gives b's walk in
// one step. About 30 ns per candidate pair (8 probe lookups) on one core.
//
// Parameters: vnodes (default 256, the per-endpoint count of KubeAI's CHWBL, DESIGN.md §4;
// virtual nodes hashed from "<name><index>" as in Envoy's ring_hash_lb); weights (relative,
// finite, > 0; they scale the point count); probes (default 4, range 1 .. 64). The seeds S_r
// and K_r are fixed constants in the header and are part of the placement format.
#include "pylb/dual_ring.hpp"

// XXH_INLINE_ALL compiles the system header's XXH3 inline into this file (the same algorithm
// and results as libxxhash; nothing is vendored): hashing the 8 bytes of a key then costs a
// few instructions instead of a library call, which matters at 2 x probes hashes per lookup.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <unordered_map>

// The lookup kernels are inlined into the batch loops (GCC otherwise keeps them out of line,
// which costs about a third of the batch throughput).
#if defined(__GNUC__) || defined(__clang__)
#define PYLB_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PYLB_ALWAYS_INLINE inline
#endif

namespace pylb {
namespace {

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  return out + "'";
}

std::string format_double(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

}  // namespace

namespace {
inline std::uint64_t key_pos(std::uint64_t key, int ring, std::uint32_t probe) noexcept {
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(key >> (8 * i));
  return XXH3_64bits_withSeed(bytes, sizeof bytes, DualRing::kKeySeed[ring] + probe);
}
}  // namespace

std::uint64_t DualRing::key_position(std::uint64_t key, int ring, std::uint32_t probe) noexcept {
  return key_pos(key, ring, probe);
}

std::uint64_t DualRing::point_position(const std::string& name, std::uint32_t vnode, int ring) noexcept {
  std::string buf = name;
  for (int i = 0; i < 4; ++i) buf.push_back(static_cast<char>(static_cast<unsigned char>(vnode >> (8 * i))));
  return XXH3_64bits_withSeed(buf.data(), buf.size(), kPointSeed[ring]);
}

DualRing::DualRing(std::vector<std::string> replica_ids, std::int64_t vnodes, std::vector<double> weights,
                   std::int64_t probes)
    : ids_(std::move(replica_ids)), weights_(std::move(weights)), vnodes_(vnodes), probes_(probes) {
  if (ids_.empty()) {
    throw std::invalid_argument("replica_ids must name at least one replica, got an empty list");
  }
  if (vnodes_ < 1) {
    throw std::invalid_argument("vnodes must be >= 1, got " + std::to_string(vnodes_));
  }
  if (probes_ < 1 || probes_ > kMaxProbes) {
    throw std::invalid_argument("probes must be in [1, " + std::to_string(kMaxProbes) + "], got " +
                                std::to_string(probes_));
  }
  std::unordered_map<std::string, std::size_t> seen;
  seen.reserve(ids_.size());
  for (std::size_t i = 0; i < ids_.size(); ++i) {
    if (ids_[i].empty()) {
      throw std::invalid_argument("replica_ids[" + std::to_string(i) + "] is an empty name ''");
    }
    auto [it, fresh] = seen.emplace(ids_[i], i);
    if (!fresh) {
      throw std::invalid_argument("replica_ids must be unique: " + quoted(ids_[i]) + " is at positions " +
                                  std::to_string(it->second) + " and " + std::to_string(i));
    }
  }
  if (weights_.empty()) {
    weights_.assign(ids_.size(), 1.0);
  } else if (weights_.size() != ids_.size()) {
    throw std::invalid_argument("weights must have one entry per replica (" + std::to_string(ids_.size()) +
                                "), got " + std::to_string(weights_.size()));
  }
  for (std::size_t i = 0; i < weights_.size(); ++i) {
    if (!(std::isfinite(weights_[i]) && weights_[i] > 0.0)) {
      throw std::invalid_argument("weights[" + std::to_string(i) + "] must be a finite number > 0, got " +
                                  format_double(weights_[i]));
    }
  }
  // Mean over the sorted weights, so that the result (to the last bit) does not depend on the
  // order of the list.
  std::vector<double> sorted = weights_;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0.0;
  for (double w : sorted) sum += w;
  const double mean = sum / static_cast<double>(sorted.size());
  if (!std::isfinite(mean)) {
    throw std::invalid_argument("weights are too large to average (sum overflows), got max " +
                                format_double(sorted.back()));
  }
  counts_.resize(ids_.size());
  std::size_t total = 0;
  for (std::size_t i = 0; i < ids_.size(); ++i) {
    const double c = std::round(static_cast<double>(vnodes_) * (weights_[i] / mean));
    if (!(c <= static_cast<double>(kMaxPoints))) {
      throw std::invalid_argument("vnodes x weights gives too many points on a ring (replica " + quoted(ids_[i]) +
                                  " would get " + format_double(c) + ", limit " + std::to_string(kMaxPoints) + ")");
    }
    counts_[i] = std::max<std::uint32_t>(1, static_cast<std::uint32_t>(c));
    total += counts_[i];
  }
  if (total > kMaxPoints) {
    throw std::invalid_argument("vnodes (" + std::to_string(vnodes_) + ") x " + std::to_string(ids_.size()) +
                                " replicas gives " + std::to_string(total) + " points per ring, limit " +
                                std::to_string(kMaxPoints));
  }
  build_ring(0);
  build_ring(1);
}

void DualRing::build_ring(int r) {
  struct Point {
    std::uint64_t pos;
    std::uint32_t owner;
    std::uint32_t vnode;
  };
  std::vector<Point> pts;
  std::size_t total = 0;
  for (std::uint32_t c : counts_) total += c;
  pts.reserve(total);
  for (std::size_t i = 0; i < ids_.size(); ++i) {
    std::string buf = ids_[i];
    const std::size_t n = buf.size();
    buf.resize(n + 4);
    for (std::uint32_t v = 0; v < counts_[i]; ++v) {
      for (std::size_t b = 0; b < 4; ++b) buf[n + b] = static_cast<char>(static_cast<unsigned char>(v >> (8 * b)));
      pts.push_back({XXH3_64bits_withSeed(buf.data(), buf.size(), kPointSeed[r]), static_cast<std::uint32_t>(i), v});
    }
  }
  // Order by position; equal positions (about 2^-64 per pair) by name, then vnode, so that the
  // ring does not depend on the order of replica_ids.
  std::sort(pts.begin(), pts.end(), [this](const Point& x, const Point& y) {
    if (x.pos != y.pos) return x.pos < y.pos;
    if (x.owner != y.owner) return ids_[x.owner] < ids_[y.owner];
    return x.vnode < y.vnode;
  });

  Ring& ring = rings_[r];
  const std::size_t m = pts.size();
  ring.pos.resize(m + 1);
  ring.owner.resize(m);
  for (std::size_t j = 0; j < m; ++j) {
    ring.pos[j] = pts[j].pos;
    ring.owner[j] = pts[j].owner;
  }
  ring.pos[m] = ~std::uint64_t{0};  // sentinel: no key position is above it

  // Bucket table: 2^bits buckets, 2^bits >= 2m (under half a point per bucket on average),
  // indexed by the top bits of a position.
  unsigned bits = 1;
  while ((std::size_t{1} << bits) < 2 * m) ++bits;
  ring.shift = 64u - bits;
  const std::size_t buckets = std::size_t{1} << bits;
  ring.bucket.resize(buckets + 1);
  std::size_t j = 0;
  for (std::size_t k = 0; k < buckets; ++k) {
    const std::uint64_t start = static_cast<std::uint64_t>(k) << ring.shift;
    while (j < m && ring.pos[j] < start) ++j;
    ring.bucket[k] = static_cast<std::uint32_t>(j);
  }
  ring.bucket[buckets] = static_cast<std::uint32_t>(m);

  // next_other[j]: the first point after j (clockwise) whose replica differs from owner[j];
  // j itself when there is only one replica. Two passes backwards around the ring.
  ring.next_other.assign(m, 0);
  if (ids_.size() > 1) {
    // next_other[t] = t + 1 if its owner differs, else next_other[t + 1]. The first pass is
    // right everywhere but in the run that wraps past the end; the second pass fixes it.
    for (int pass = 0; pass < 2; ++pass) {
      for (std::size_t t = m; t-- > 0;) {
        const std::size_t after = t + 1 == m ? 0 : t + 1;
        ring.next_other[t] = ring.owner[after] != ring.owner[t] ? static_cast<std::uint32_t>(after)
                                                                : ring.next_other[after];
      }
    }
  } else {
    for (std::size_t t = 0; t < m; ++t) ring.next_other[t] = static_cast<std::uint32_t>(t);
  }
}

PYLB_ALWAYS_INLINE std::uint32_t DualRing::nearest_point(const Ring& ring, std::uint64_t key, int r) const noexcept {
  const std::uint64_t* pos = ring.pos.data();  // m points, then the sentinel UINT64_MAX
  const std::uint32_t* bucket = ring.bucket.data();
  const unsigned shift = ring.shift;
  const auto m = static_cast<std::uint32_t>(ring.pos.size() - 1);
  const auto probes = static_cast<std::uint32_t>(probes_);
  // Successor of q and its distance. The bucket's first point, then at most a few steps (a
  // bucket holds under half a point on average): two branch-free steps and a loop that is
  // rarely entered. The sentinel stops every scan at m, which wraps to point 0.
  const auto successor = [&](std::uint64_t q, std::uint64_t& d) {
    std::uint32_t i = bucket[q >> shift];
    i += static_cast<std::uint32_t>(pos[i] < q);
    i += static_cast<std::uint32_t>(pos[i] < q);
    while (pos[i] < q) ++i;
    i = i == m ? 0 : i;
    d = pos[i] - q;  // unsigned: wraps past 2^64 as the ring does
    return i;
  };
  std::uint64_t best_d;
  std::uint32_t best = successor(key_pos(key, r, 0), best_d);
  for (std::uint32_t p = 1; p < probes; ++p) {
    std::uint64_t d;
    const std::uint32_t i = successor(key_pos(key, r, p), d);
    // Strictly nearer wins, so the lowest probe wins a tie. Written as selects (not branches):
    // which probe wins is a coin toss the branch predictor cannot learn.
    const bool nearer = d < best_d;
    best = nearer ? i : best;
    best_d = nearer ? d : best_d;
  }
  return best;
}

PYLB_ALWAYS_INLINE std::pair<std::uint32_t, std::uint32_t> DualRing::candidate_pair(std::uint64_t key) const noexcept {
  const std::uint32_t a = rings_[0].owner[nearest_point(rings_[0], key, 0)];
  const Ring& r1 = rings_[1];
  std::uint32_t j = nearest_point(r1, key, 1);
  j = r1.owner[j] == a ? r1.next_other[j] : j;  // with one replica next_other[j] == j
  return {a, r1.owner[j]};
}

std::uint32_t DualRing::owner(std::uint64_t key, int ring) const noexcept {
  return rings_[ring].owner[nearest_point(rings_[ring], key, ring)];
}

std::pair<std::uint32_t, std::uint32_t> DualRing::candidates(std::uint64_t key) const noexcept {
  return candidate_pair(key);
}

void DualRing::owners_batch(const std::uint64_t* keys, std::size_t n, int ring, std::int32_t* out) const noexcept {
  const Ring& rg = rings_[ring];
  for (std::size_t t = 0; t < n; ++t) {
    out[t] = static_cast<std::int32_t>(rg.owner[nearest_point(rg, keys[t], ring)]);
  }
}

void DualRing::candidates_batch(const std::uint64_t* keys, std::size_t n, std::int32_t* a,
                                std::int32_t* b) const noexcept {
  for (std::size_t t = 0; t < n; ++t) {
    const auto ab = candidate_pair(keys[t]);
    a[t] = static_cast<std::int32_t>(ab.first);
    b[t] = static_cast<std::int32_t>(ab.second);
  }
}

}  // namespace pylb
