// Dual consistent-hash ring (DESIGN.md §3): two independent rings over the same replicas, so
// that every key has two candidate replicas (a, b) with a != b whenever there are >= 2 replicas.
// The algorithm, its formulas and the choice of parameters are described at the top of
// src/dual_ring.cpp. This header is plain C++ (no Python).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pylb {

class DualRing {
 public:
  // Defaults, written once here; the bindings read them from these constants.
  static constexpr std::int64_t kDefaultVnodes = 256;  // Envoy ring_hash / KubeAI CHWBL use 256-ish
  static constexpr std::int64_t kDefaultProbes = 4;    // multi-probe count, chosen by measurement
  static constexpr std::int64_t kMaxProbes = 64;
  static constexpr std::size_t kMaxPoints = std::size_t{1} << 24;  // per ring, all replicas together

  // Seeds of the XXH3 hashes. Ring r places replica points with kPointSeed[r] and remixes keys
  // with kKeySeed[r] + probe. Changing any of them moves every key: they are part of the format.
  static constexpr std::uint64_t kPointSeed[2] = {0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL};
  static constexpr std::uint64_t kKeySeed[2] = {0xA4093822299F31D0ULL, 0x082EFA98EC4E6C89ULL};

  // Builds both rings. `weights` empty means all 1. Throws std::invalid_argument (message names
  // the argument and the value) on: no replicas, an empty or duplicate name, vnodes < 1,
  // weights of the wrong length or not finite and > 0, probes outside [1, kMaxProbes], or more
  // than kMaxPoints points on a ring.
  DualRing(std::vector<std::string> replica_ids, std::int64_t vnodes, std::vector<double> weights,
           std::int64_t probes);

  std::size_t size() const noexcept { return ids_.size(); }
  const std::vector<std::string>& replica_ids() const noexcept { return ids_; }
  const std::vector<double>& weights() const noexcept { return weights_; }
  // Points each replica has on each ring (the same on both rings).
  const std::vector<std::uint32_t>& vnode_counts() const noexcept { return counts_; }
  std::int64_t vnodes() const noexcept { return vnodes_; }
  std::int64_t probes() const noexcept { return probes_; }
  std::size_t points() const noexcept { return rings_[0].owner.size(); }

  // Raw owner of `key` on ring 0 or 1 (ring must be 0 or 1; not checked here).
  std::uint32_t owner(std::uint64_t key, int ring) const noexcept;
  // Candidates (a, b): a = owner on ring 0; b = owner on ring 1, or, when that is a, the owner
  // of the next point clockwise on ring 1 that belongs to another replica. (0, 0) with 1 replica.
  std::pair<std::uint32_t, std::uint32_t> candidates(std::uint64_t key) const noexcept;

  // Batch forms over n keys; outputs are replica indices.
  void owners_batch(const std::uint64_t* keys, std::size_t n, int ring, std::int32_t* out) const noexcept;
  void candidates_batch(const std::uint64_t* keys, std::size_t n, std::int32_t* a,
                        std::int32_t* b) const noexcept;

  // Ring position of probe p of `key` on ring r, and of vnode v of a replica name on ring r
  // (exposed so that tests can pin the format).
  static std::uint64_t key_position(std::uint64_t key, int ring, std::uint32_t probe) noexcept;
  static std::uint64_t point_position(const std::string& name, std::uint32_t vnode, int ring) noexcept;

 private:
  struct Ring {
    std::vector<std::uint64_t> pos;     // sorted point positions, then a sentinel UINT64_MAX
    std::vector<std::uint32_t> owner;   // replica index of each point
    std::vector<std::uint32_t> next_other;  // next point (clockwise) owned by another replica
    std::vector<std::uint32_t> bucket;  // bucket[k] = first point with pos >= k << shift; 2^bits + 1 entries
    unsigned shift = 63;
  };

  void build_ring(int r);
  // Index of the point chosen for `key` on ring r: the successor of the probe nearest to its
  // successor (multi-probe consistent hashing).
  std::uint32_t nearest_point(const Ring& ring, std::uint64_t key, int r) const noexcept;
  std::pair<std::uint32_t, std::uint32_t> candidate_pair(std::uint64_t key) const noexcept;

  std::vector<std::string> ids_;
  std::vector<double> weights_;
  std::vector<std::uint32_t> counts_;
  std::int64_t vnodes_;
  std::int64_t probes_;
  Ring rings_[2];
};

}  // namespace pylb
