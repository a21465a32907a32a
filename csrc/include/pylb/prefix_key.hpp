// Adaptive prefix key: DualMap's hot-prefix table (DESIGN.md §3; DualMap, arXiv 2602.06502).
//
// DualMap places a request with two hash functions of a *prefix key*. Keying on too short a prefix
// sends every request that shares it (a universal system prompt: block 0 of every request in the
// Mooncake conversation trace) to the same two replicas; keying on too long a prefix scatters the
// requests that could share a cache. The key therefore adapts: it starts at depth 1 (the first key
// block, 512 tokens by default) and goes one block deeper while the prefix at the current depth is
// *hot*, i.e. holds a large share of recent traffic.
//
// Input: the chained hashes at key-block boundaries, b[0..n). Because the hashes are chained,
// b[d-1] names the whole prefix of depth d, and the key at depth d *is* b[d-1].
//
// State:
//   - a sliding window (ring buffer) of the last `window` requests; each slot remembers the prefix
//     hashes that request counted, b[0..min(n, max_depth)), and the depth of the key it got;
//   - count[p]: how many requests in the window hold prefix p; share(p) = count[p] /
//     max(fill, min_samples), where fill = requests in the window (= window once it has filled);
//   - an "expanded" flag per prefix, with hysteresis. A prefix that is not expanded becomes
//     expanded when share(p) >= expand_share; an expanded prefix stays
//     expanded until share(p) < shrink_share (and is forgotten when its count reaches 0). The flag
//     is re-evaluated whenever the prefix's count changes and whenever a key walk passes it, so
//     key walks always see the rule applied to the current window.
//
// key_for(b): record the request in the window (evicting the oldest once full), then
//     d = 1; while d < n and d < max_depth and expanded(b[d-1]): d += 1
//     return (b[d-1], d)
// A request with no full key block (n == 0) is keyed by a caller-supplied short key (its last
// fine-grained block hash, or a hash of the whole prompt) at depth 0; it occupies a window slot
// (it is a request and dilutes every share) but counts no prefix.
//
// Parameters (defaults from the DualMap paper unless said otherwise):
//   window = 200 requests; expand_share = 0.0612 (6.12 %); shrink_share = 0.02 (2 %, the
//   hysteresis floor, so a prefix near the threshold does not flap between depths);
//   min_samples = 20 (shares are judged against at least this many requests, so the first
//   request does not hold 100 % of a 1-request window: while the window fills, a prefix expands
//   once ceil(expand_share * min_samples) = 2 requests hold it, which is what its share would be
//   in a window of min_samples requests. A hard gate instead -- nothing expands before
//   min_samples requests -- keys every request of a fresh router by its first block alone, so
//   requests that share only a universal system prompt all get the same two candidates, and the
//   cache mirror then sends them to the one that saw the first: one replica takes all of a new
//   fleet's first min_samples requests);
//   max_depth = 16 key blocks (8192 tokens at 512 tokens per block). Each request counts up to
//   max_depth prefixes and a key walk visits up to max_depth of them, so the cap bounds the work
//   per request (a few hundred ns) and the window's memory (window * max_depth hashes). 16 blocks
//   is far deeper than the Mooncake conversation trace needs (one universal block, after which
//   no 2-block prefix holds more than 0.36 %, so keys settle at depth 2); a fleet whose common
//   prefix is longer than 8k tokens should raise it, or every request under that prefix gets the
//   same key (this default is not from the paper).
// Ranges: window >= 1; 0 < shrink_share <= expand_share <= 1; min_samples >= 1; max_depth >= 1;
// window * max_depth <= 2^24.
//
// Cost: key_for does O(min(n, max_depth)) hash-table updates for the new request, the same for the
// evicted one, and a walk of at most the key's depth; well under a microsecond for 16 levels.
// Not thread-safe; one router owns one table.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "pylb/flat_u64_map.hpp"

namespace pylb {

struct PrefixKeyParams {
  std::size_t window = 200;
  double expand_share = 0.0612;
  double shrink_share = 0.02;
  std::size_t min_samples = 20;
  std::size_t max_depth = 16;
};

struct PrefixKey {
  std::uint64_t key;
  std::size_t depth;  // 0 for a prompt shorter than one key block
};

class PrefixKeyTable {
 public:
  // Throws std::invalid_argument naming the bad field and its value.
  explicit PrefixKeyTable(const PrefixKeyParams& params = PrefixKeyParams{});

  // Records the request and returns its key. `hashes` are the n chained boundary hashes; when
  // n == 0 the key is (short_key, 0).
  PrefixKey key_for(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key);

  // The key key_for would give with the window as it stands, without recording the request
  // (so the request's own count is not included).
  PrefixKey peek(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key) const;

  // Exactly the key key_for(hashes, n, short_key) would return now (the request counted, the
  // oldest evicted from a full window, the hysteresis flags updated in key_for's order), without
  // changing the table: a router chooses with it and records with key_for once the choice stands.
  PrefixKey key_if_recorded(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key) const;

  const PrefixKeyParams& params() const noexcept { return params_; }
  std::size_t fill() const noexcept { return fill_; }                   // requests in the window
  std::size_t expanded_count() const noexcept { return expanded_; }     // prefixes flagged expanded
  std::size_t tracked_prefixes() const noexcept { return counts_.size(); }
  std::size_t count(std::uint64_t prefix) const noexcept;               // requests in the window holding it
  bool is_expanded(std::uint64_t prefix) const noexcept;                // the rule applied now
  // depth_counts()[d] = requests in the window whose key had depth d (0..max_depth).
  const std::vector<std::size_t>& depth_counts() const noexcept { return depth_hist_; }
  void reset();

 private:
  bool hot(const FlatU64Map::Slot* s) const noexcept;
  bool hot_rule(std::size_t count, bool expanded, std::size_t fill) const noexcept;
  void update_flag(FlatU64Map::Slot* s) noexcept;
  void evict_slot(std::size_t slot);  // un-counts the request in a full window's `slot`

  PrefixKeyParams params_;
  std::vector<std::uint64_t> slot_prefixes_;  // window * max_depth; slot i owns [i*max_depth, ...)
  std::vector<std::uint32_t> slot_len_;       // prefixes counted by the request in slot i
  std::vector<std::uint32_t> slot_depth_;     // key depth returned to the request in slot i
  std::size_t next_ = 0;                      // slot the next request goes to
  std::size_t fill_ = 0;
  FlatU64Map counts_;                         // prefix -> (count, expanded flag)
  std::size_t expanded_ = 0;
  std::vector<std::size_t> depth_hist_;
};

}  // namespace pylb
