// A small open-addressing hash map from 64-bit keys to a pair of 32-bit values, used by the
// adaptive prefix key table (counts per prefix hash) and the cache mirror (LRU node per block).
//
// The keys are block hashes, already well mixed, so the home slot is a Fibonacci hash of the key
// (one multiply and a shift); collisions are resolved by linear probing, and erasing shifts the
// following run back (no tombstones), so lookups never slow down after many erases. A slot is 16
// bytes (key, value, extra) and four share a cache line; a slot is empty when value == kEmpty, so
// any 64-bit key, 0 included, can be stored, and value may hold anything but kEmpty. The table
// doubles when it is 3/4 full. Pointers to slots are invalidated by insert() and erase().
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace pylb {

class FlatU64Map {
 public:
  static constexpr std::uint32_t kEmpty = 0xFFFFFFFFu;

  struct Slot {
    std::uint64_t key;
    std::uint32_t value;  // kEmpty marks an empty slot
    std::uint32_t extra;
  };

  FlatU64Map() { rehash(16); }

  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  // The slot holding `key`, or nullptr.
  Slot* find(std::uint64_t key) noexcept { return const_cast<Slot*>(std::as_const(*this).find(key)); }
  const Slot* find(std::uint64_t key) const noexcept {
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.value == kEmpty) return nullptr;
      if (s.key == key) return &s;
    }
  }

  // The slot for `key`, inserted with (value, extra) when absent; second is true when inserted.
  std::pair<Slot*, bool> insert(std::uint64_t key, std::uint32_t value, std::uint32_t extra = 0) {
    if (value == kEmpty) throw std::invalid_argument("FlatU64Map: value must not be kEmpty");
    if ((size_ + 1) * 4 > slots_.size() * 3) rehash(slots_.size() * 2);
    std::size_t i = home(key);
    for (;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.value == kEmpty) break;
      if (s.key == key) return {&s, false};
    }
    slots_[i] = Slot{key, value, extra};
    ++size_;
    return {&slots_[i], true};
  }

  // Erases `key`; returns whether it was there.
  bool erase(std::uint64_t key) noexcept {
    Slot* s = find(key);
    if (s == nullptr) return false;
    erase_slot(s);
    return true;
  }

  // Erases the slot `s` (a pointer returned by find/insert and still valid).
  void erase_slot(Slot* s) noexcept {
    std::size_t hole = static_cast<std::size_t>(s - slots_.data());
    // Backward-shift deletion: move each later member of the probe run into the hole when the
    // hole lies between its home slot and its current slot (cyclically).
    for (std::size_t j = (hole + 1) & mask_;; j = (j + 1) & mask_) {
      Slot& cand = slots_[j];
      if (cand.value == kEmpty) break;
      const std::size_t h = home(cand.key);
      if (((j - h) & mask_) >= ((j - hole) & mask_)) {
        slots_[hole] = cand;
        hole = j;
      }
    }
    slots_[hole].value = kEmpty;
    --size_;
  }

  // Removes everything; keeps at most `keep_slots` slots of storage (rounded to a power of two).
  void clear(std::size_t keep_slots = 16) {
    size_ = 0;
    std::size_t cap = 16;
    while (cap < keep_slots) cap *= 2;
    if (cap < slots_.size()) {
      reset_storage(cap);
    } else {
      for (Slot& s : slots_) s.value = kEmpty;
    }
  }

  // Makes room for `n` keys without rehashing.
  void reserve(std::size_t n) {
    std::size_t cap = slots_.size();
    while (n * 4 > cap * 3) cap *= 2;
    if (cap != slots_.size()) rehash(cap);
  }

  // Calls f(slot) for every occupied slot (f must not insert or erase).
  template <class F>
  void for_each(F&& f) {
    for (Slot& s : slots_) {
      if (s.value != kEmpty) f(s);
    }
  }

  // Hints the CPU to load the home slot of `key` (for lookups issued a few steps ahead).
  void prefetch(std::uint64_t key) const noexcept {
#if defined(__GNUC__)
    __builtin_prefetch(&slots_[home(key)]);
#else
    (void)key;
#endif
  }

 private:
  std::size_t home(std::uint64_t key) const noexcept {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  // Fresh empty storage of `cap` slots (a power of two >= 2).
  void reset_storage(std::size_t cap) {
    std::vector<Slot>(cap, Slot{0, kEmpty, 0}).swap(slots_);
    mask_ = cap - 1;
    unsigned bits = 0;
    while ((std::size_t{1} << bits) < cap) ++bits;
    shift_ = 64u - bits;
  }

  void rehash(std::size_t new_cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    reset_storage(new_cap);
    for (const Slot& s : old) {
      if (s.value == kEmpty) continue;
      std::size_t i = home(s.key);
      while (slots_[i].value != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  unsigned shift_ = 64;
  std::size_t size_ = 0;
};

}  // namespace pylb
