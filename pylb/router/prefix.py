"""Prefix keys: which part of a prompt decides its replicas (DualMap's adaptive key).

Design (DESIGN.md §3-4; DualMap, arXiv 2602.06502)
-------------------------------------------------
A request carries chained hashes of its prompt in router blocks of `block_chars` bytes
(64 B, about 16 tokens): h[j] names the whole prefix up to the end of block j. The prefix key is
taken at *key-block* granularity (`key_block_tokens`, 64 by default = 256 bytes = K = 4 router
blocks), and the hash at the end of key block d (1-based) names the prefix of depth d:

    boundaries = [h[K-1], h[2K-1], ..., h[dK-1]]          d = len(h) // K full key blocks
               + [h[-1]]     when len(h) % K != 0 and d >= 1 (the trailing partial key block)

The trailing partial block is a boundary too because prompts whose only full key block is a
universal system prompt would otherwise all get the same key: on the Mooncake conversation
trace every prompt starts with the same 512-token block and 11 % have no second full one, so
without it 11 % of the traffic would share two replicas. It is only used when every shallower
prefix is hot (the key walk stops at the first prefix that is not), so it never splits a
conversation whose shared prefix is still cold.

A prompt shorter than one key block has no boundary and is keyed by a *short key*: its last
router block hash h[-1] (which names the whole prompt up to its last full 64-byte block), or,
with no full router block at all, `RoutingRequest.prompt_hash` (a hash of the whole text), or
failing that a hash of its token count. Every key is a pure function of the prompt, so all
router replicas agree.

The key depth is adaptive (`pylb.native.PrefixKeyTable`: start at depth 1, go one key block
deeper while the prefix holds >= 6.12 % of the last 200 requests, with hysteresis down to 2 %)
or fixed (`fixed_depth` >= 1: the boundary at min(depth, boundaries), for the ablation). The
deepest key covers `DEEPEST_KEY_TOKENS` (8192) tokens whatever the key-block size: the table's
max_depth is that over the key block (128 key blocks of 64 tokens).
Per request: one slice of the hash array and one `key_for` (O(max_depth) hash-table work).

Why 64-token key blocks (512 before 2026-12-06; BENCHMARKS.md "Key blocks of 64 tokens"): a
key block is the granularity at which the key can tell prefix groups apart. A prompt shorter
than one key block gets a short key, which names the whole prompt: every turn of a conversation
and every conversation of a prefix group then has its own two candidates, so the group prompt
and the conversation's own prefix are found only by following the cache, and a group's new
conversations pile onto the first replicas that hold its prompt. With 512-token blocks that was
every prompt of the scaled CPU workloads (a 128-token group prompt, prompts of 200-400 tokens),
and on those the smaller block raised dualmap's capacity by 5-21 % at 8 replicas and 6-34 % at
32; elsewhere the finer key is level (the hot-prefix walk goes as deep as before, in smaller
steps), and on 2 replicas, where the two candidates are the whole fleet, it changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pylb import native

from .interface import RouterOptions, RoutingRequest

_U64 = np.uint64

DEEPEST_KEY_TOKENS = 8192
"""Tokens of the deepest prefix key, at any key-block size (the table's max_depth is this over the
key block): a hot prefix of up to 8192 tokens still gets a deeper key (DualMap's 16 key blocks of
512 tokens)."""


def _min_samples(expand_share: float) -> int:
    """The table's min_samples for `expand_share`: while the window fills, a prefix expands once
    as many requests hold it as at the paper's share and min_samples (2; shares are judged against
    at least min_samples requests), so a larger share (dualmap's hot_share=fleet, 1/N) does not
    key a fresh router's first 1/share x 2 requests under a universal system prompt by that
    prompt alone; never more than the default."""
    d = native.PREFIX_KEY_DEFAULTS
    first = math.ceil(float(d["expand_share"]) * int(d["min_samples"]))
    return min(int(d["min_samples"]), math.ceil(first / expand_share))


def boundary_hashes(block_hashes: np.ndarray, blocks_per_key: int, max_depth: int | None = None) -> np.ndarray:
    """The prefix-key boundaries of a prompt (see the module docstring), at most `max_depth`.

    `block_hashes` are the prompt's router block hashes (uint64); `blocks_per_key` is K.
    Returns a new contiguous uint64 array (empty for a prompt shorter than one key block).
    """
    n = len(block_hashes)
    full = n // blocks_per_key
    if full == 0:
        return np.empty(0, dtype=_U64)
    take = full if max_depth is None else min(full, max_depth)
    out = np.asarray(block_hashes[blocks_per_key - 1 : take * blocks_per_key : blocks_per_key], dtype=_U64)
    if n % blocks_per_key and (max_depth is None or take < max_depth):
        out = np.append(out, _U64(block_hashes[-1]))
    return np.ascontiguousarray(out)


def short_key(request: RoutingRequest) -> int:
    """The key of a prompt with no full key block: its last router block hash, else its
    `prompt_hash`, else a hash of its token count (all pure functions of the prompt)."""
    if len(request.block_hashes):
        return int(request.block_hashes[-1])
    if request.prompt_hash is not None:
        return int(request.prompt_hash) & 0xFFFFFFFFFFFFFFFF
    return native.xxh3_64(int(request.prompt_tokens).to_bytes(8, "little", signed=True))


class PrefixKeyer:
    """Computes a request's prefix key: adaptive (DualMap's hot-prefix table) or fixed depth.

    Args:
        options: the router options (`blocks_per_key_block` sets K).
        fixed_depth: 0 for the adaptive key; d >= 1 keys every prompt at depth min(d, its
            boundaries).
        table: `PrefixKeyTable` parameters to override (window, expand_share, shrink_share,
            min_samples, max_depth); the defaults are the table's own (`native.PREFIX_KEY_DEFAULTS`:
            DualMap's 200 requests and 6.12 %, written once in the C++ core), but for max_depth,
            which is `DEEPEST_KEY_TOKENS` over the key block unless given, and min_samples, which
            follows a given expand_share (`_min_samples`) unless given.
    """

    def __init__(self, options: RouterOptions, *, fixed_depth: int = 0, **table: Any) -> None:
        if fixed_depth < 0:
            raise ValueError(f"fixed_depth must be >= 0 (0 = adaptive), got {fixed_depth}")
        self.blocks_per_key = options.blocks_per_key_block
        self.fixed_depth = fixed_depth
        if "max_depth" not in table:  # the deepest key covers the same tokens at any key-block size
            table["max_depth"] = max(1, -(-DEEPEST_KEY_TOKENS // options.key_block_tokens))
        if "expand_share" in table and "min_samples" not in table:
            table["min_samples"] = _min_samples(float(table["expand_share"]))
        self.table = native.PrefixKeyTable(**table)
        self.max_depth = self.table.max_depth

    def key(self, request: RoutingRequest) -> tuple[int, int]:
        """(key, depth) of the request; records it in the adaptive table's window."""
        key, depth, pending = self.peek(request)
        self.record(pending)
        return key, depth

    def peek(self, request: RoutingRequest) -> tuple[int, int, tuple[np.ndarray, int | None] | None]:
        """(key, depth, pending): exactly the key `key` gives, without recording the request.
        `pending` is what `record` needs to record it (None for a fixed-depth keyer, which has
        no window); a policy peeks in `choose` and records in `on_choice`."""
        if self.fixed_depth:
            b = boundary_hashes(request.block_hashes, self.blocks_per_key, self.fixed_depth)
            return (int(b[-1]), len(b), None) if len(b) else (short_key(request), 0, None)
        b = boundary_hashes(request.block_hashes, self.blocks_per_key, self.max_depth)
        sk = short_key(request) if len(b) == 0 else None
        key, depth = self.table.key_if_recorded(b, sk)
        return key, depth, (b, sk)

    def record(self, pending: tuple[np.ndarray, int | None] | None) -> None:
        """Record a peeked request in the adaptive window (`pending` from `peek`)."""
        if pending is not None:
            self.table.key_for(*pending)
