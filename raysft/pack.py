"""Sort+pack stage: best-fit-decreasing on the length histogram, and slot assignment.

Pure numpy, no engine. Lengths are integers in ``1..seq_length``, so best-fit-decreasing can
run on ``hist[L]`` (how many samples have length L) instead of on the samples: bins that hold
the same lengths are interchangeable, so the planner tracks *groups* of identical bins and
moves many items at once. The result is a :class:`PackPlan`: distinct pack *patterns* (a tuple
of lengths) with a multiplicity each. Memory and time depend on ``seq_length`` and the number
of distinct patterns, not on the number of samples, so only histograms and the plan need to
cross the network. The bin count is exactly that of item-level BFD (``bfd_items``), which the
tests check.

Each sample then finds its slot from its rank inside its length class (input order, computed
from per-run prefix counts), through a seeded permutation of the class, so samples of one
length do not land in packs in input order. Output pack order is another seeded permutation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- seeded permutations

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized (uint64 arithmetic wraps)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def derive_key(seed: int, *parts: int) -> np.uint64:
    k = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    for p in parts:
        k = mix64(k ^ mix64(np.array([p & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)))
    return k[0]


def permute(x: np.ndarray, n: np.ndarray | int, key: np.ndarray | int, rounds: int = 4) -> np.ndarray:
    """A seeded bijection of ``[0, n)`` applied to each ``x`` (vectorized, O(1) memory).

    A balanced Feistel network over the smallest even bit width covering ``n``, with cycle
    walking back into range. ``n`` and ``key`` may be arrays (one domain per element).
    """
    x = np.asarray(x, dtype=np.uint64)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape)
    if x.size == 0:
        return x.copy()
    if np.any(x >= n):
        raise ValueError("permute: x must be < n")
    bits = np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.uint64)
    # float log2 may be off by one near powers of two: fix up exactly
    bits = np.where((np.uint64(1) << bits) < n, bits + np.uint64(1), bits)
    half = (bits + np.uint64(1)) // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    out = x.copy()
    todo = np.ones(x.shape, dtype=bool)
    y = x.copy()
    while todo.any():
        idx = np.nonzero(todo)[0]
        v, h, m, k = y[idx], half[idx], mask[idx], key[idx]
        left, right = v >> h, v & m
        for r in range(rounds):
            f = mix64(right ^ mix64(k + np.uint64(r + 1))) & m
            left, right = right, left ^ f
        v = (left << h) | right
        y[idx] = v
        done = v < n[idx]
        out[idx[done]] = v[done]
        todo[idx[done]] = False
    return out


# --------------------------------------------------------------------------- planner


@dataclass
class PackPlan:
    seq_length: int
    patterns: list[tuple[int, ...]]  # lengths in each pattern, decreasing
    counts: np.ndarray  # int64 multiplicity of each pattern

    @property
    def num_packs(self) -> int:
        return int(self.counts.sum())

    @property
    def num_tokens(self) -> int:
        return int(sum(sum(p) * int(c) for p, c in zip(self.patterns, self.counts)))

    def pack_fill(self) -> np.ndarray:
        """Histogram of tokens per pack: fill[t] = packs holding t tokens."""
        fill = np.zeros(self.seq_length + 1, dtype=np.int64)
        for p, c in zip(self.patterns, self.counts):
            fill[sum(p)] += int(c)
        return fill


def lower_bound(hist: np.ndarray, seq_length: int) -> int:
    total = int(np.dot(np.arange(len(hist), dtype=np.int64), hist.astype(np.int64)))
    return -(-total // seq_length)


def plan_bfd(hist: np.ndarray, seq_length: int) -> PackPlan:
    """Best-fit-decreasing over a length histogram (``hist[L]`` items of length L).

    Exactly item-level BFD: each item goes to the open bin with the least remaining capacity
    that still fits it, else to a new bin. Groups of bins with equal content and capacity are
    moved together; when an item leaves a bin that still fits another item of the same length,
    that same bin is best, so it is filled ``floor(cap / L)`` times before the next bin.
    """
    hist = np.asarray(hist, dtype=np.int64)
    if len(hist) > seq_length + 1 and hist[seq_length + 1 :].any():
        raise ValueError("plan_bfd: histogram has lengths above seq_length")
    if hist[0] if len(hist) else 0:
        raise ValueError("plan_bfd: zero-length items")
    S = seq_length
    # pattern tree: node -> (parent, length, repeat); node 0 is the empty bin
    parent: list[int] = [-1]
    plen: list[int] = [0]
    prep: list[int] = [0]
    by_cap: dict[int, list[list[int]]] = {}  # capacity -> list of [node, multiplicity]
    caps: list[int] = []  # sorted capacities with groups

    def add(cap: int, node: int, m: int) -> None:
        groups = by_cap.get(cap)
        if groups is None:
            by_cap[cap] = [[node, m]]
            bisect.insort(caps, cap)
        else:
            groups.append([node, m])

    def extend(node: int, length: int, q: int) -> int:
        parent.append(node)
        plen.append(length)
        prep.append(q)
        return len(parent) - 1

    for L in range(min(len(hist) - 1, S), 0, -1):
        c = int(hist[L])
        while c > 0:
            i = bisect.bisect_left(caps, L)
            if i < len(caps):
                r = caps[i]
                groups = by_cap[r]
                node, m = groups[-1]
            else:
                r, node, m = S, 0, None  # open new bins: unlimited empty bins
            q = r // L  # items one bin takes before it stops being the best fit
            full = c // q if m is None else min(m, c // q)
            if full:
                add(r - q * L, extend(node, L, q), full)
                c -= full * q
                if m is not None:
                    m -= full
            if c and 0 < c < q and (m is None or m > 0):
                add(r - c * L, extend(node, L, c), 1)
                c = 0
                if m is not None:
                    m -= 1
            if m is not None:
                if m == 0:
                    groups.pop()
                    if not groups:
                        del by_cap[r]
                        caps.pop(bisect.bisect_left(caps, r))
                else:
                    groups[-1][1] = m
    # collect final groups (every group at every capacity is a set of closed bins)
    finals: dict[tuple[int, ...], int] = {}
    for groups in by_cap.values():
        for node, m in groups:
            pat: list[int] = []
            while node > 0:
                pat += [plen[node]] * prep[node]
                node = parent[node]
            key = tuple(sorted(pat, reverse=True))
            finals[key] = finals.get(key, 0) + m
    patterns = sorted(finals, key=lambda p: (-sum(p), p))
    return PackPlan(S, patterns, np.array([finals[p] for p in patterns], dtype=np.int64))


def bfd_items(lengths, seq_length: int) -> list[list[int]]:
    """Reference item-level best-fit-decreasing (for tests and small inputs)."""
    bins: list[list[int]] = []
    open_caps: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for L in sorted(lengths, reverse=True):
        i = bisect.bisect_left(open_caps, (L, -1))
        if i < len(open_caps):
            cap, b = open_caps.pop(i)
        else:
            cap, b = seq_length, len(bins)
            bins.append([])
        bins[b].append(L)
        if cap - L > 0:
            bisect.insort(open_caps, (cap - L, b))
    return bins


# --------------------------------------------------------------------------- slot assignment


@dataclass
class SlotTable:
    """For every (length, pattern) with that length: where its slots are.

    Slots of length class L are numbered pattern by pattern; within pattern p (multiplicity m,
    holding c items of length L at positions pos..pos+c-1) slot j is pack
    ``pack_start[p] + j // c`` at position ``pos + j % c``.
    """

    seq_length: int
    num_packs: int
    class_count: np.ndarray  # int64 [S+1]: slots (samples) per length
    class_start: np.ndarray  # int64 [S+1]: global slot offset of each class
    entry_start: np.ndarray  # int64 [E]: global slot offset of each entry (sorted)
    entry_pack: np.ndarray  # int64 [E]
    entry_items: np.ndarray  # int64 [E]: c
    entry_pos: np.ndarray  # int64 [E]


def slot_table(plan: PackPlan) -> SlotTable:
    S = plan.seq_length
    pack_start = np.concatenate([[0], np.cumsum(plan.counts)[:-1]]).astype(np.int64)
    rows = []  # (L, pattern index, c, pos)
    for p, pat in enumerate(plan.patterns):
        pos = 0
        for L in sorted(set(pat), reverse=True):
            c = pat.count(L)
            rows.append((L, p, c, pos))
            pos += c
    rows.sort()
    E = len(rows)
    L_ = np.array([r[0] for r in rows], dtype=np.int64).reshape(E)
    p_ = np.array([r[1] for r in rows], dtype=np.int64).reshape(E)
    c_ = np.array([r[2] for r in rows], dtype=np.int64).reshape(E)
    pos_ = np.array([r[3] for r in rows], dtype=np.int64).reshape(E)
    slots = c_ * plan.counts[p_] if E else np.zeros(0, dtype=np.int64)
    entry_start = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.int64) if E else slots
    class_count = np.zeros(S + 1, dtype=np.int64)
    np.add.at(class_count, L_, slots)
    class_start = np.concatenate([[0], np.cumsum(class_count)[:-1]]).astype(np.int64)
    return SlotTable(
        seq_length=S,
        num_packs=plan.num_packs,
        class_count=class_count,
        class_start=class_start,
        entry_start=entry_start,
        entry_pack=pack_start[p_] if E else p_,
        entry_items=c_,
        entry_pos=pos_,
    )


_CLASS_KEYS: dict[tuple[int, int], np.ndarray] = {}


def class_keys(seed: int, seq_length: int) -> np.ndarray:
    """The permutation key of every length class (computed once per seed, vectorized)."""
    k = (seed, seq_length)
    if k not in _CLASS_KEYS:
        base = np.uint64(derive_key(seed, 1))
        _CLASS_KEYS[k] = mix64(np.arange(seq_length + 1, dtype=np.uint64) ^ base)
    return _CLASS_KEYS[k]


def assign_slots(table: SlotTable, lengths: np.ndarray, ranks: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Map samples (length, rank within its length class in input order) to (pack, position).

    The rank goes through a seeded permutation of its class before it picks a slot, so the
    assignment within a length class is a seeded shuffle. Returns the output pack index (itself
    a seeded permutation of the plan's pack numbering) and the position inside the pack.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    n = table.class_count[lengths]
    if np.any(ranks >= n) or np.any(ranks < 0):
        raise ValueError("assign_slots: rank outside its length class")
    keys = class_keys(seed, table.seq_length)
    slot = permute(ranks.astype(np.uint64), n.astype(np.uint64), keys[lengths]).astype(np.int64)
    g = table.class_start[lengths] + slot
    e = np.searchsorted(table.entry_start, g, side="right") - 1
    j = g - table.entry_start[e]
    c = table.entry_items[e]
    pack = table.entry_pack[e] + j // c
    pos = table.entry_pos[e] + j % c
    out_pack = permute(pack.astype(np.uint64), table.num_packs, derive_key(seed, 2)).astype(np.int64)
    return out_pack, pos


# --------------------------------------------------------------------------- per block


class RunOffsets:
    """Same-length samples before each run, computed run by run in input order.

    Feed the runs of every block in input order (``offsets``): the running counts are one
    array of ``seq_length + 1``, and each block gets only the offsets of its own runs, so
    neither the driver's memory nor a task's plan grows with the number of blocks."""

    def __init__(self, seq_length: int):
        self.running = np.zeros(seq_length + 1, dtype=np.int64)

    def offsets(self, runs: dict) -> dict:
        """``runs``: run key -> {length: kept samples}, of one block; returns run key ->
        (lengths, samples of each length before the run)."""
        out = {}
        for key in sorted(runs):
            lengths = np.array(sorted(runs[key]), dtype=np.int64)
            out[key] = (lengths, self.running[lengths].copy())
            self.running[lengths] += np.array([runs[key][L] for L in lengths.tolist()], dtype=np.int64)
        return out


def unique_rows(*cols: np.ndarray, return_inverse: bool = False, return_counts: bool = False):
    """``np.unique(np.stack(cols, axis=1), axis=0, ...)`` for integer columns, by one lexsort
    (numpy's axis=0 unique sorts rows as opaque records, several times slower): the distinct
    rows in ascending order, and optionally each row's index into them and their counts."""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    n = len(cols[0]) if cols else 0
    order = np.lexsort(cols[::-1]) if n else np.zeros(0, np.int64)
    new = np.zeros(n, dtype=bool)
    if n:
        new[0] = True
        for c in cols:
            sc = c[order]
            new[1:] |= sc[1:] != sc[:-1]
    firsts = order[new]
    uniq = np.stack([c[firsts] for c in cols], axis=1) if cols else np.zeros((0, 0), np.int64)
    out = [uniq]
    if return_inverse:
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.cumsum(new) - 1
        out.append(inverse)
    if return_counts:
        starts = np.flatnonzero(new)
        out.append(np.diff(np.append(starts, n)))
    return out[0] if len(out) == 1 else tuple(out)


def block_ranks(n: np.ndarray, chunk: np.ndarray, run_first: np.ndarray, run_rank: np.ndarray,
                run_offsets: dict) -> np.ndarray:
    """Rank of each kept sample of a block in its length class (input order)."""
    base = np.zeros(len(n), dtype=np.int64)
    keys, inverse = unique_rows(chunk, run_first, return_inverse=True)
    for j, (c, r) in enumerate(keys.tolist()):
        lengths, offsets = run_offsets[(c, r)]
        rows = inverse == j
        base[rows] = offsets[np.searchsorted(lengths, n[rows])]
    return base + run_rank
