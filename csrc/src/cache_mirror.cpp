// Cache mirror; the design comment (semantics, layout, insert order) is in
// include/pylb/cache_mirror.hpp.
#include "pylb/cache_mirror.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

namespace pylb {
namespace {

constexpr std::size_t kPrefetchAhead = 8;  // match looks this many blocks ahead

std::size_t words_for(std::size_t replicas) { return std::max<std::size_t>(1, (replicas + 63) / 64); }

// Calls f(bit index) for every set bit of `bits`, offset by `base`.
template <class F>
inline void for_each_bit(std::uint64_t bits, std::size_t base, F&& f) {
  while (bits != 0) {
    f(base + static_cast<std::size_t>(__builtin_ctzll(bits)));
    bits &= bits - 1;
  }
}

}  // namespace

// ---- ReplicaMaskTable ------------------------------------------------------------------------

ReplicaMaskTable::ReplicaMaskTable(std::size_t words) : words_(words), stride_(words + 1) { reset_storage(64); }

void ReplicaMaskTable::reset_storage(std::size_t cap) {
  std::vector<std::uint64_t>(cap * stride_, 0).swap(data_);
  cap_ = cap;
  mask_ = cap - 1;
  unsigned bits = 0;
  while ((std::size_t{1} << bits) < cap) ++bits;
  shift_ = 64u - bits;
}

bool ReplicaMaskTable::vacant(const std::uint64_t* slot) const noexcept {
  for (std::size_t w = 1; w <= words_; ++w) {
    if (slot[w] != 0) return false;
  }
  return true;
}

const std::uint64_t* ReplicaMaskTable::find(std::uint64_t key) const noexcept {
  for (std::size_t i = home(key);; i = (i + 1) & mask_) {
    const std::uint64_t* slot = &data_[i * stride_];
    if (vacant(slot)) return nullptr;
    if (slot[0] == key) return slot + 1;
  }
}

void ReplicaMaskTable::rehash(std::size_t cap, std::size_t words) {
  std::vector<std::uint64_t> old;
  old.swap(data_);
  const std::size_t old_cap = cap_;
  const std::size_t old_stride = stride_;
  const std::size_t old_words = words_;
  words_ = words;
  stride_ = words + 1;
  reset_storage(cap);
  const std::size_t copy = std::min(old_words, words);
  for (std::size_t j = 0; j < old_cap; ++j) {
    const std::uint64_t* src = &old[j * old_stride];
    bool any = false;
    for (std::size_t w = 1; w <= old_words; ++w) any = any || src[w] != 0;
    if (!any) continue;
    std::size_t i = home(src[0]);
    while (!vacant(&data_[i * stride_])) i = (i + 1) & mask_;
    std::copy(src, src + 1 + copy, &data_[i * stride_]);
  }
}

void ReplicaMaskTable::restride(std::size_t words) { rehash(cap_, words); }

void ReplicaMaskTable::set_bit(std::uint64_t key, std::size_t bit) {
  if ((size_ + 1) * 4 > cap_ * 3) rehash(cap_ * 2, words_);
  std::size_t i = home(key);
  std::uint64_t* slot = nullptr;
  for (;; i = (i + 1) & mask_) {
    slot = &data_[i * stride_];
    if (vacant(slot)) {
      slot[0] = key;
      ++size_;
      break;
    }
    if (slot[0] == key) break;
  }
  slot[1 + bit / 64] |= std::uint64_t{1} << (bit % 64);
}

void ReplicaMaskTable::clear_bit(std::uint64_t key, std::size_t bit) noexcept {
  std::size_t hole = home(key);
  for (;; hole = (hole + 1) & mask_) {
    std::uint64_t* slot = &data_[hole * stride_];
    if (vacant(slot)) return;
    if (slot[0] == key) break;
  }
  std::uint64_t* slot = &data_[hole * stride_];
  slot[1 + bit / 64] &= ~(std::uint64_t{1} << (bit % 64));
  if (!vacant(slot)) return;
  // No replica holds the block any more: erase it by backward-shift deletion (see flat_u64_map.hpp).
  --size_;
  for (std::size_t j = (hole + 1) & mask_;; j = (j + 1) & mask_) {
    std::uint64_t* cand = &data_[j * stride_];
    if (vacant(cand)) break;
    const std::size_t h = home(cand[0]);
    if (((j - h) & mask_) >= ((j - hole) & mask_)) {
      std::copy(cand, cand + stride_, &data_[hole * stride_]);
      hole = j;
    }
  }
  std::fill(&data_[hole * stride_ + 1], &data_[hole * stride_ + stride_], std::uint64_t{0});
}

void ReplicaMaskTable::remove_bit(std::size_t bit) noexcept {
  const std::size_t w0 = bit / 64;
  const std::uint64_t low = (std::uint64_t{1} << (bit % 64)) - 1;  // bits below `bit` in word w0
  for (std::size_t i = 0; i < cap_; ++i) {
    std::uint64_t* m = &data_[i * stride_ + 1];
    if (vacant(m - 1)) continue;
    for (std::size_t w = w0; w < words_; ++w) {
      const std::uint64_t carry = w + 1 < words_ ? (m[w + 1] & 1u) << 63 : 0;
      m[w] = w == w0 ? (m[w] & low) | ((m[w] >> 1) & ~low) | carry : (m[w] >> 1) | carry;
    }
  }
}

// ---- CacheMirror -----------------------------------------------------------------------------

CacheMirror::CacheMirror(std::size_t num_replicas, std::size_t capacity_blocks)
    : replicas_(num_replicas), masks_(words_for(num_replicas)) {
  for (Replica& rep : replicas_) rep.capacity = capacity_blocks;
}

const CacheMirror::Replica& CacheMirror::at(std::size_t replica) const {
  if (replica >= replicas_.size()) {
    throw std::out_of_range("replica " + std::to_string(replica) + " out of range for " +
                            std::to_string(replicas_.size()) + " replicas");
  }
  return replicas_[replica];
}

CacheMirror::Replica& CacheMirror::at(std::size_t replica) {
  return const_cast<Replica&>(std::as_const(*this).at(replica));
}

void CacheMirror::unlink(Replica& rep, std::uint32_t i) noexcept {
  Node& n = rep.nodes[i];
  if (n.prev != kNil) {
    rep.nodes[n.prev].next = n.next;
  } else {
    rep.head = n.next;
  }
  if (n.next != kNil) {
    rep.nodes[n.next].prev = n.prev;
  } else {
    rep.tail = n.prev;
  }
}

void CacheMirror::push_front(Replica& rep, std::uint32_t i) noexcept {
  Node& n = rep.nodes[i];
  n.prev = kNil;
  n.next = rep.head;
  if (rep.head != kNil) rep.nodes[rep.head].prev = i;
  rep.head = i;
  if (rep.tail == kNil) rep.tail = i;
}

void CacheMirror::evict_lru(Replica& rep, std::size_t r) {
  const std::uint32_t i = rep.tail;
  const std::uint64_t hash = rep.nodes[i].hash;
  unlink(rep, i);
  rep.free_nodes.push_back(i);
  rep.index.erase(hash);
  masks_.clear_bit(hash, r);
  --rep.size;
}

void CacheMirror::touch(Replica& rep, std::size_t r, std::uint64_t hash, std::size_t& evicted) {
  if (const FlatU64Map::Slot* s = rep.index.find(hash)) {
    const std::uint32_t i = s->value;
    if (rep.head != i) {
      unlink(rep, i);
      push_front(rep, i);
    }
    return;
  }
  if (rep.size >= rep.capacity) {
    evict_lru(rep, r);
    ++evicted;
  }
  std::uint32_t i;
  if (!rep.free_nodes.empty()) {
    i = rep.free_nodes.back();
    rep.free_nodes.pop_back();
    rep.nodes[i].hash = hash;
  } else {
    if (rep.nodes.size() >= kNil - 1) throw std::length_error("CacheMirror: too many blocks in one replica");
    i = static_cast<std::uint32_t>(rep.nodes.size());
    rep.nodes.push_back(Node{hash, kNil, kNil});
  }
  push_front(rep, i);
  rep.index.insert(hash, i);
  masks_.set_bit(hash, r);
  ++rep.size;
}

void CacheMirror::match(const std::uint64_t* hashes, std::size_t n, std::int64_t* out) const {
  const std::size_t replicas = replicas_.size();
  if (replicas == 0) return;
  const std::size_t words = masks_.words();
  std::uint64_t local[8];
  std::vector<std::uint64_t> heap;
  std::uint64_t* running = local;
  if (words > 8) {
    heap.resize(words);
    running = heap.data();
  }
  for (std::size_t w = 0; w < words; ++w) {
    const std::size_t in_word = std::min<std::size_t>(64, replicas > w * 64 ? replicas - w * 64 : 0);
    running[w] = in_word == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << in_word) - 1;
  }
  for (std::size_t k = 0; k < std::min(n, kPrefetchAhead); ++k) masks_.prefetch(hashes[k]);
  for (std::size_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) masks_.prefetch(hashes[i + kPrefetchAhead]);
    const std::uint64_t* m = masks_.find(hashes[i]);
    const auto len = static_cast<std::int64_t>(i);
    std::uint64_t any = 0;
    for (std::size_t w = 0; w < words; ++w) {
      const std::uint64_t keep = m != nullptr ? running[w] & m[w] : 0;
      for_each_bit(running[w] & ~keep, w * 64, [&](std::size_t r) { out[r] = len; });
      running[w] = keep;
      any |= keep;
    }
    if (any == 0) return;
  }
  for (std::size_t w = 0; w < words; ++w) {
    for_each_bit(running[w], w * 64, [&](std::size_t r) { out[r] = static_cast<std::int64_t>(n); });
  }
}

std::size_t CacheMirror::insert(std::size_t replica, const std::uint64_t* hashes, std::size_t n) {
  Replica& rep = at(replica);
  const std::size_t k = std::min(n, rep.capacity);
  std::size_t evicted = 0;
  for (std::size_t i = k; i-- > 0;) touch(rep, replica, hashes[i], evicted);
  return evicted;
}

std::size_t CacheMirror::remove(std::size_t replica, const std::uint64_t* hashes, std::size_t n) {
  Replica& rep = at(replica);
  std::size_t removed = 0;
  for (std::size_t j = 0; j < n; ++j) {
    FlatU64Map::Slot* s = rep.index.find(hashes[j]);
    if (s == nullptr) continue;
    const std::uint32_t i = s->value;
    rep.index.erase_slot(s);
    unlink(rep, i);
    rep.free_nodes.push_back(i);
    masks_.clear_bit(hashes[j], replica);
    --rep.size;
    ++removed;
  }
  return removed;
}

void CacheMirror::clear(std::size_t replica) {
  Replica& rep = at(replica);
  for (std::uint32_t i = rep.head; i != kNil; i = rep.nodes[i].next) masks_.clear_bit(rep.nodes[i].hash, replica);
  rep.size = 0;
  rep.head = rep.tail = kNil;
  rep.nodes.clear();
  rep.nodes.shrink_to_fit();
  rep.free_nodes.clear();
  rep.free_nodes.shrink_to_fit();
  rep.index.clear();
}

std::size_t CacheMirror::resize(std::size_t replica, std::size_t capacity) {
  Replica& rep = at(replica);
  rep.capacity = capacity;
  std::size_t evicted = 0;
  while (rep.size > capacity) {
    evict_lru(rep, replica);
    ++evicted;
  }
  return evicted;
}

void CacheMirror::ensure_words_for(std::size_t replicas) {
  const std::size_t words = words_for(replicas);
  if (words != masks_.words()) masks_.restride(words);
}

std::size_t CacheMirror::add_replica(std::size_t capacity) {
  ensure_words_for(replicas_.size() + 1);
  replicas_.emplace_back();
  replicas_.back().capacity = capacity;
  return replicas_.size() - 1;
}

void CacheMirror::remove_replica(std::size_t replica) {
  clear(replica);  // drops its bits (and every block only it held)
  replicas_.erase(replicas_.begin() + static_cast<std::ptrdiff_t>(replica));
  masks_.remove_bit(replica);
  ensure_words_for(replicas_.size());
}

std::size_t CacheMirror::size(std::size_t replica) const { return at(replica).size; }

std::size_t CacheMirror::capacity(std::size_t replica) const { return at(replica).capacity; }

bool CacheMirror::contains(std::size_t replica, std::uint64_t hash) const {
  return at(replica).index.find(hash) != nullptr;
}

void CacheMirror::blocks(std::size_t replica, std::uint64_t* out) const {
  const Replica& rep = at(replica);
  for (std::uint32_t i = rep.head; i != kNil; i = rep.nodes[i].next) *out++ = rep.nodes[i].hash;
}

}  // namespace pylb
