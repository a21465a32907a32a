// Cache mirror: the router's estimate of which KV blocks each replica holds (DESIGN.md §3).
//
// Semantics follow vLLM's automatic prefix caching: a replica holds a set of block hashes (chained,
// so a hash names its whole prefix) of bounded size `capacity` blocks, evicted least recently used
// first, and a prompt reuses a replica's cache only for its *leading* blocks: the match length is
// the number of leading hashes the replica holds, and the first missing block ends it (a hole stops
// the match even when later blocks are present).
//
// Layout, built for one fast `match` over all replicas:
//   - one global open-addressing table block hash -> bitmask of the replicas holding it, stored
//     inline as W = ceil(num_replicas / 64) uint64 words per slot (a slot is empty when its mask is
//     all zero), so any number of replicas works and W = 1 up to 64 replicas;
//   - per replica an LRU list (intrusive doubly linked list over a node pool) and a hash -> node
//     index, with the replica's capacity.
// match(h[0..n)): running = all replicas; for i in 0..n: running &= mask(h[i]); each replica
// leaving `running` at step i gets length i; stop when running is empty; the rest get n. One table
// lookup per leading block (prefetched a few blocks ahead), at most n lookups whatever the replica
// count. match reads only and does not change recency.
//
// insert(r, h[0..n)) keeps the leading k = min(n, capacity) blocks and touches them in reverse
// order, h[k-1] first and h[0] last, so that the prompt's first block ends most recently used and
// its tail least. LRU then evicts a prompt's tail before its head, which is what vLLM does (it
// frees a finished request's blocks tail first, so they are evicted first): a prefix is never
// evicted while a longer extension of it stays, and the leading-match length degrades gracefully
// instead of dropping to zero. Inserting k <= capacity blocks never evicts one of those k blocks.
// Evicting a block clears the replica's bit and drops the global entry when no replica holds it.
// remove()/clear() apply vLLM KV events (BlockRemoved, AllBlocksCleared); resize() applies a newly
// scraped cache size (vllm:cache_config_info num_gpu_blocks), evicting LRU blocks down to it.
//
// Replica indices are dense 0..num_replicas-1; remove_replica(i) shifts the replicas after i down
// by one. Capacity 0 holds nothing. Not thread-safe: the router serialises all access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "pylb/flat_u64_map.hpp"

namespace pylb {

// Block hash -> bitmask of replicas, W words per key stored inline. Internal to CacheMirror.
class ReplicaMaskTable {
 public:
  explicit ReplicaMaskTable(std::size_t words);

  std::size_t words() const noexcept { return words_; }
  std::size_t size() const noexcept { return size_; }
  // The W mask words of `key`, or nullptr when no replica holds it.
  const std::uint64_t* find(std::uint64_t key) const noexcept;
  void set_bit(std::uint64_t key, std::size_t bit);
  void clear_bit(std::uint64_t key, std::size_t bit) noexcept;
  // Deletes bit `bit` from every mask, moving the higher bits down by one (no mask may hold only it).
  void remove_bit(std::size_t bit) noexcept;
  // Re-lays the table with `words` words per mask (bits beyond them must be clear).
  void restride(std::size_t words);
  void prefetch(std::uint64_t key) const noexcept {
#if defined(__GNUC__)
    __builtin_prefetch(&data_[home(key) * stride_]);
#else
    (void)key;
#endif
  }

 private:
  std::size_t home(std::uint64_t key) const noexcept {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  bool vacant(const std::uint64_t* slot) const noexcept;
  void reset_storage(std::size_t cap);
  void rehash(std::size_t cap, std::size_t words);

  std::size_t words_;
  std::size_t stride_;  // 1 + words_: key, then the mask
  std::vector<std::uint64_t> data_;
  std::size_t cap_ = 0;
  std::size_t mask_ = 0;
  unsigned shift_ = 64;
  std::size_t size_ = 0;
};

class CacheMirror {
 public:
  CacheMirror(std::size_t num_replicas, std::size_t capacity_blocks);

  std::size_t num_replicas() const noexcept { return replicas_.size(); }
  // out[r] = number of leading hashes replica r holds, for every replica (out has num_replicas()).
  void match(const std::uint64_t* hashes, std::size_t n, std::int64_t* out) const;
  // Makes the leading min(n, capacity) hashes most recently used (hashes[0] the most); returns the
  // number of blocks evicted to make room.
  std::size_t insert(std::size_t replica, const std::uint64_t* hashes, std::size_t n);
  // Drops the given hashes from the replica (absent ones are ignored); returns how many it held.
  std::size_t remove(std::size_t replica, const std::uint64_t* hashes, std::size_t n);
  void clear(std::size_t replica);
  // Sets the capacity, evicting least recently used blocks down to it; returns how many.
  std::size_t resize(std::size_t replica, std::size_t capacity);
  std::size_t add_replica(std::size_t capacity);  // returns the new replica's index
  void remove_replica(std::size_t replica);        // later replicas' indices shift down by one

  std::size_t size(std::size_t replica) const;
  std::size_t capacity(std::size_t replica) const;
  bool contains(std::size_t replica, std::uint64_t hash) const;
  // The replica's hashes, most recently used first (out has size(replica) elements).
  void blocks(std::size_t replica, std::uint64_t* out) const;
  std::size_t distinct_blocks() const noexcept { return masks_.size(); }

 private:
  static constexpr std::uint32_t kNil = 0xFFFFFFFFu;
  struct Node {
    std::uint64_t hash;
    std::uint32_t prev;  // towards the most recently used end
    std::uint32_t next;  // towards the least recently used end
  };
  struct Replica {
    std::size_t capacity = 0;
    std::size_t size = 0;
    std::uint32_t head = kNil;  // most recently used
    std::uint32_t tail = kNil;  // least recently used
    std::vector<Node> nodes;
    std::vector<std::uint32_t> free_nodes;
    FlatU64Map index;  // hash -> node
  };

  const Replica& at(std::size_t replica) const;
  Replica& at(std::size_t replica);
  static void unlink(Replica& rep, std::uint32_t i) noexcept;
  static void push_front(Replica& rep, std::uint32_t i) noexcept;
  void touch(Replica& rep, std::size_t r, std::uint64_t hash, std::size_t& evicted);
  void evict_lru(Replica& rep, std::size_t r);
  void ensure_words_for(std::size_t replicas);

  std::vector<Replica> replicas_;
  ReplicaMaskTable masks_;
};

}  // namespace pylb
