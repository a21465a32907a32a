"""An approximate radix tree over prompt block hashes, per worker, with LRU eviction by size.

Design
------
SGLang router's approximate prefix tree (`sgl-router/src/policies/tree.rs`), over pylb's
router block hashes instead of characters: equal leading hashes mean equal leading text, so a
radix tree over the hashes is SGLang's tree at block granularity. A node holds a run of blocks
(a numpy uint64 array, compared with a request's hashes in one vector operation), its children
by first block, and per worker holding it one last access time. A worker holds whole nodes; a
touch or an eviction that ends inside a node splits it there first, so every block keeps its own
last access time, exactly as in a per-block map (tests/test_policies_cache_aware.py keeps that
per-block map as the reference and checks that both hold the same blocks). A worker's holding
is prefix-closed (insert adds whole paths, eviction removes leaves); nodes no worker holds are
dropped. Eviction takes a worker's leaf blocks by (last access time, block hash), lowest first,
as one heap of blocks would. Sizes are counted in blocks.

Reading (`match`) changes nothing; `touch`, `insert` and `evict` write. The `cache-aware` policy
(`pylb.router.policies.cache_aware`) reads in `choose` and writes in `on_choice`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Sequence

import numpy as np

from pylb.router.interface import ReplicaId
from pylb.router.policy import peek_choice

_EMPTY = np.empty(0, dtype=np.uint64)


def as_hashes(hashes: np.ndarray | Sequence[int]) -> np.ndarray:
    """Block hashes as a uint64 array (a request's `block_hashes` already is one)."""
    return np.asarray(hashes, dtype=np.uint64)


class _Node:
    """A radix-tree node: the run of blocks on the edge into it (`key`, never empty below the
    root), its children by their first block, and the workers holding it (all of its blocks)
    with their last access time."""

    __slots__ = ("key", "children", "times")

    def __init__(self, key: np.ndarray, times: dict[ReplicaId, float]) -> None:
        self.key = key
        self.children: dict[int, _Node] = {}
        self.times = times


def _common(key: np.ndarray, hashes: np.ndarray, pos: int) -> int:
    """Length of the common prefix of `key` and `hashes[pos:]`, given key[0] == hashes[pos]."""
    n = len(key)
    if n == 1:
        return 1
    seg = hashes[pos : pos + n]
    if len(seg) < n:
        key = key[: len(seg)]
    diff = key != seg
    return int(diff.argmax()) if diff.any() else len(seg)


class ApproxTree:
    """SGLang's multi-tenant approximate prefix tree: a radix tree over chained block hashes.

    Every node holds a run of blocks and, per worker (tenant) holding it, one last access time,
    so a worker's blocks in one node are always held and touched together: a touch or an
    eviction that ends inside a node splits it there first. A worker's held nodes are
    prefix-closed (insert adds whole paths, eviction removes leaves), and a node no worker holds
    is removed. `tenants[name]` is the worker's size in blocks.

    The tree is equivalent, block for block, to one map block -> last access time per worker
    (the first, per-block implementation, kept as the reference in
    tests/test_policies_cache_aware.py): the same match depths, sizes and evictions, including the
    order in which eviction takes equally old leaf blocks (lowest block hash first). It costs
    per request a walk over the nodes of the request's path instead of per-block dict updates.
    """

    def __init__(self) -> None:
        self.root = _Node(_EMPTY, {})
        self.tenants: dict[ReplicaId, int] = {}

    def add_tenant(self, name: ReplicaId) -> None:
        """Add an empty tree for a worker (SGLang: `insert("", url)`)."""
        self.tenants.setdefault(name, 0)

    def remove_tenant(self, name: ReplicaId) -> None:
        """Drop a worker and everything it holds (nodes held by no one else go)."""
        if self.tenants.pop(name, None) is None:
            return
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.times.pop(name, None) is not None:
                    if child.times:
                        stack.append(child)
                    else:
                        del node.children[first]

    def size(self, name: ReplicaId) -> int:
        """Blocks the worker's tree holds (SGLang's `tenant_char_count`, in blocks)."""
        return self.tenants[name]

    def block_count(self) -> int:
        """Distinct blocks in the tree (held by at least one worker)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    def _walk(self, hashes: np.ndarray) -> list[tuple[_Node, _Node, int]]:
        """(parent, node, matched) for each node on the path of `hashes` from the root:
        `matched` leading blocks of the node are on the path (all but maybe in the last one)."""
        path = []
        parent, pos, n = self.root, 0, len(hashes)
        while pos < n:
            node = parent.children.get(int(hashes[pos]))
            if node is None:
                break
            m = _common(node.key, hashes, pos)
            path.append((parent, node, m))
            if m < len(node.key):
                break
            pos += m
            parent = node
        return path

    @staticmethod
    def _split(parent: _Node, node: _Node, m: int) -> _Node:
        """Cut `node` after its first `m` blocks; returns the new upper part (same holders)."""
        upper = _Node(node.key[:m], dict(node.times))
        node.key = node.key[m:]
        upper.children[int(node.key[0])] = node
        parent.children[int(upper.key[0])] = upper
        return upper

    def insert(self, hashes: np.ndarray | Sequence[int], name: ReplicaId, now: float) -> None:
        """Add the path to the worker's tree, touching every block on it."""
        hashes = as_hashes(hashes)
        self.add_tenant(name)
        added, pos, last = 0, 0, self.root
        for parent, node, m in self._walk(hashes):
            if m < len(node.key):
                node = self._split(parent, node, m)
            if name not in node.times:
                added += m
            node.times[name] = now
            pos += m
            last = node
        if pos < len(hashes):
            last.children[int(hashes[pos])] = _Node(hashes[pos:].copy(), {name: now})
            added += len(hashes) - pos
        self.tenants[name] += added

    def match_depth(self, hashes: np.ndarray | Sequence[int], name: ReplicaId) -> int:
        """Leading blocks of `hashes` the worker holds."""
        depth = 0
        for _, node, m in self._walk(as_hashes(hashes)):
            if name not in node.times:
                break
            depth += m
        return depth

    def prefix_match(
        self, hashes: np.ndarray | Sequence[int], now: float, rng: random.Random
    ) -> tuple[int, ReplicaId | None]:
        """Depth of the deepest node on the path and one worker holding it (None at depth 0).

        Touches the picked worker's matched path, as SGLang's `prefix_match` does (`match`, the
        draw, then `touch`)."""
        depth, name, tied = self.match(hashes, rng)
        if name is not None:
            if tied > 1:
                rng.choice(range(tied))  # the draw `match` peeked
            self.touch(hashes, name, now)
        return depth, name

    def match(self, hashes: np.ndarray | Sequence[int], rng: random.Random) -> tuple[int, ReplicaId | None, int]:
        """(depth, worker, tied): the deepest node's depth on the request's path, the worker
        holding it that `rng.choice` picks among the `tied` holders (in name order), without
        changing the tree or advancing `rng`; (0, None, 0) when no worker holds any of it."""
        path = self._walk(as_hashes(hashes))
        depths: dict[ReplicaId, int] = {}
        pos = 0
        for _, node, m in path:
            pos += m
            for name in node.times:  # a worker holding a node holds the path above it
                depths[name] = pos
        if not depths:
            return 0, None, 0
        best = pos  # the last node on the path is held by someone
        holders = sorted(name for name, d in depths.items() if d == best)
        name = holders[0] if len(holders) == 1 else peek_choice(rng, holders)
        return best, name, len(holders)

    def touch(self, hashes: np.ndarray | Sequence[int], name: ReplicaId, now: float) -> None:
        """Set the worker's last access time to `now` along the request's matched path."""
        for parent, node, m in self._walk(as_hashes(hashes)):
            if m < len(node.key):
                node = self._split(parent, node, m)
            node.times[name] = now

    def evict(self, max_size: int) -> None:
        """Shrink every worker's tree to `max_size` blocks, least recently used leaves first."""
        for name, size in list(self.tenants.items()):
            if size > max_size:
                self._evict(name, size - max_size)

    def _evict(self, name: ReplicaId, need: int) -> None:
        """Remove `need` blocks of the worker: its leaf blocks in order of (last access, hash),
        a block becoming a leaf once its held child is gone (SGLang `evict_tenant_by_size`)."""
        parents: dict[_Node, _Node] = {}
        kids: dict[_Node, int] = {}  # held children of the worker's inner nodes
        heap: list[tuple[float, int, int, _Node]] = []  # (time, tail block, tie-break, leaf)
        order = itertools.count()
        root = self.root
        stack = [root]
        while stack:
            node = stack.pop()
            held = 0
            for child in node.children.values():
                if name in child.times:
                    parents[child] = node
                    stack.append(child)
                    held += 1
            if node is not root:
                if held:
                    kids[node] = held
                else:
                    heap.append((node.times[name], int(node.key[-1]), next(order), node))
        heapq.heapify(heap)
        while need > 0 and heap:
            t, _, _, node = heapq.heappop(heap)
            length = len(node.key)
            k = length
            if heap and heap[0][0] == t:
                # An equally old leaf is next: blocks go one by one in hash order, so this node
                # loses its tail blocks below that leaf's block, then that leaf has its turn.
                above = node.key[::-1] >= np.uint64(heap[0][1])
                if above.any():
                    k = max(1, int(above.argmax()))
            k = min(k, need)
            need -= k
            self.tenants[name] -= k
            if k < length:
                if len(node.times) == 1:  # only this worker holds it, so it has no children
                    node.key = node.key[: length - k]
                else:
                    parent, lower = parents[node], node
                    node = self._split(parent, lower, length - k)
                    del lower.times[name]
                    parents[node] = parent
                heapq.heappush(heap, (t, int(node.key[-1]), next(order), node))
                continue
            del node.times[name]
            parent = parents[node]
            if not node.times:
                del parent.children[int(node.key[0])]
            if parent is not root:
                kids[parent] -= 1
                if kids[parent] == 0:
                    heapq.heappush(heap, (parent.times[name], int(parent.key[-1]), next(order), parent))

    def sync(self, names: Iterable[ReplicaId]) -> None:
        """Make the tenants exactly `names`: add empty trees, drop workers that left."""
        wanted = set(names)
        for name in [n for n in self.tenants if n not in wanted]:
            self.remove_tenant(name)
        for name in wanted:
            self.add_tenant(name)
