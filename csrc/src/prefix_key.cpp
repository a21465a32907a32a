// Adaptive prefix key table; the design comment and the rule are in include/pylb/prefix_key.hpp.
#include "pylb/prefix_key.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pylb {
namespace {

constexpr std::size_t kMaxWindowSlots = std::size_t{1} << 24;  // window * max_depth

template <class T>
[[noreturn]] void bad(const char* field, T value, const char* rule) {
  std::ostringstream msg;
  msg << field << " must be " << rule << ", got " << value;
  throw std::invalid_argument(msg.str());
}

}  // namespace

PrefixKeyTable::PrefixKeyTable(const PrefixKeyParams& params) : params_(params) {
  const auto& p = params_;
  if (p.window < 1) bad("window", p.window, ">= 1");
  if (!(p.expand_share > 0.0 && p.expand_share <= 1.0)) bad("expand_share", p.expand_share, "in (0, 1]");
  if (!(p.shrink_share > 0.0 && p.shrink_share <= p.expand_share)) {
    std::ostringstream rule;
    rule << "in (0, expand_share=" << p.expand_share << "]";
    bad("shrink_share", p.shrink_share, rule.str().c_str());
  }
  if (p.min_samples < 1) bad("min_samples", p.min_samples, ">= 1");
  if (p.max_depth < 1) bad("max_depth", p.max_depth, ">= 1");
  if (p.window > kMaxWindowSlots / p.max_depth) {
    std::ostringstream msg;
    msg << "window * max_depth must be <= " << kMaxWindowSlots << ", got window=" << p.window
        << ", max_depth=" << p.max_depth;
    throw std::invalid_argument(msg.str());
  }
  slot_prefixes_.assign(p.window * p.max_depth, 0);
  slot_len_.assign(p.window, 0);
  slot_depth_.assign(p.window, 0);
  depth_hist_.assign(p.max_depth + 1, 0);
  counts_.reserve(std::min<std::size_t>(p.window * p.max_depth, 4096));
}

bool PrefixKeyTable::hot_rule(std::size_t count, bool expanded, std::size_t fill) const noexcept {
  if (fill == 0) return false;
  // shares of a window still filling are judged against min_samples requests (the header says why)
  const double share = static_cast<double>(count) / static_cast<double>(std::max(fill, params_.min_samples));
  if (expanded) return share >= params_.shrink_share;  // expanded: stays until below the floor
  return share >= params_.expand_share;
}

bool PrefixKeyTable::hot(const FlatU64Map::Slot* s) const noexcept {
  return s != nullptr && hot_rule(s->value, s->extra != 0, fill_);
}

void PrefixKeyTable::update_flag(FlatU64Map::Slot* s) noexcept {
  const bool now = hot(s);
  if (now != (s->extra != 0)) {
    s->extra = now ? 1u : 0u;
    if (now) {
      ++expanded_;
    } else {
      --expanded_;
    }
  }
}

void PrefixKeyTable::evict_slot(std::size_t slot) {
  const std::uint64_t* prefixes = &slot_prefixes_[slot * params_.max_depth];
  const std::uint32_t len = slot_len_[slot];
  --depth_hist_[slot_depth_[slot]];
  // fill_ stays at `window`: the caller puts the new request in this slot, so shares are judged
  // against the full window, as they will be once the new request is in.
  for (std::uint32_t j = 0; j < len; ++j) {
    FlatU64Map::Slot* s = counts_.find(prefixes[j]);
    if (s == nullptr) continue;  // cannot happen: every counted prefix has an entry
    if (--s->value == 0) {
      if (s->extra != 0) --expanded_;
      counts_.erase_slot(s);
    } else {
      update_flag(s);
    }
  }
}

PrefixKey PrefixKeyTable::key_for(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key) {
  const std::size_t slot = next_;
  next_ = next_ + 1 == params_.window ? 0 : next_ + 1;
  if (fill_ == params_.window) {
    evict_slot(slot);
  } else {
    ++fill_;
  }

  // Record the request: it takes a window slot and counts its prefixes of depth 1..min(n, max_depth).
  const std::size_t counted = std::min(n, params_.max_depth);
  std::uint64_t* prefixes = &slot_prefixes_[slot * params_.max_depth];
  for (std::size_t j = 0; j < counted; ++j) {
    prefixes[j] = hashes[j];
    auto [s, inserted] = counts_.insert(hashes[j], 1u, 0u);
    if (!inserted) ++s->value;
    update_flag(s);
  }
  slot_len_[slot] = static_cast<std::uint32_t>(counted);

  PrefixKey key{short_key, 0};
  if (n > 0) {
    std::size_t d = 1;
    while (d < n && d < params_.max_depth) {
      FlatU64Map::Slot* s = counts_.find(hashes[d - 1]);
      if (s == nullptr) break;
      update_flag(s);  // applies the rule with the current fill (it grows while the window fills)
      if (s->extra == 0) break;
      ++d;
    }
    key = PrefixKey{hashes[d - 1], d};
  }
  slot_depth_[slot] = static_cast<std::uint32_t>(key.depth);
  ++depth_hist_[key.depth];
  return key;
}

PrefixKey PrefixKeyTable::peek(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key) const {
  if (n == 0) return PrefixKey{short_key, 0};
  std::size_t d = 1;
  while (d < n && d < params_.max_depth && hot(counts_.find(hashes[d - 1]))) ++d;
  return PrefixKey{hashes[d - 1], d};
}

PrefixKey PrefixKeyTable::key_if_recorded(const std::uint64_t* hashes, std::size_t n, std::uint64_t short_key) const {
  if (n == 0) return PrefixKey{short_key, 0};
  // key_for's steps, replayed for each prefix the walk visits (every one is among the request's
  // counted prefixes): the eviction of the oldest slot of a full window, then the request's own
  // count, each followed by the flag update key_for makes; the walk's own update repeats the last
  // one and changes nothing.
  const bool full = fill_ == params_.window;
  const std::size_t fill_after = full ? fill_ : fill_ + 1;
  const std::uint64_t* evicted = full ? &slot_prefixes_[next_ * params_.max_depth] : nullptr;
  const std::uint32_t evicted_len = full ? slot_len_[next_] : 0;
  std::size_t d = 1;
  while (d < n && d < params_.max_depth) {
    const std::uint64_t p = hashes[d - 1];
    const FlatU64Map::Slot* s = counts_.find(p);
    std::size_t c = s == nullptr ? 0 : s->value;
    bool expanded = s != nullptr && s->extra != 0;
    if (c > 0 && std::find(evicted, evicted + evicted_len, p) != evicted + evicted_len) {
      --c;
      expanded = c == 0 ? false : hot_rule(c, expanded, fill_);  // an entry counted to 0 is erased
    }
    expanded = hot_rule(c + 1, expanded, fill_after);
    if (!expanded) break;
    ++d;
  }
  return PrefixKey{hashes[d - 1], d};
}

std::size_t PrefixKeyTable::count(std::uint64_t prefix) const noexcept {
  const FlatU64Map::Slot* s = counts_.find(prefix);
  return s == nullptr ? 0 : s->value;
}

bool PrefixKeyTable::is_expanded(std::uint64_t prefix) const noexcept { return hot(counts_.find(prefix)); }

void PrefixKeyTable::reset() {
  next_ = 0;
  fill_ = 0;
  expanded_ = 0;
  counts_.clear(4096);
  std::fill(slot_len_.begin(), slot_len_.end(), 0u);
  std::fill(slot_depth_.begin(), slot_depth_.end(), 0u);
  std::fill(depth_hist_.begin(), depth_hist_.end(), std::size_t{0});
}

}  // namespace pylb
