import itertools
import json

import numpy as np
import pytest

from raysft.pack import assign_slots, bfd_items, lower_bound, permute, plan_bfd, slot_table


def brute_force_optimum(lengths, cap):
    """Fewest bins for a handful of items, by trying every assignment."""
    n = len(lengths)
    for bins in range(1, n + 1):
        for assignment in itertools.product(range(bins), repeat=n):
            loads = [0] * bins
            for L, b in zip(lengths, assignment):
                loads[b] += L
            if max(loads) <= cap:
                return bins
    return n


def plan_lengths(plan):
    return sorted(L for p, c in zip(plan.patterns, plan.counts) for _ in range(int(c)) for L in p)


@pytest.mark.parametrize("seed", range(40))
def test_bfd_close_to_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.integers(5, 12))
    lengths = rng.integers(1, cap + 1, size=int(rng.integers(1, 7))).tolist()
    plan = plan_bfd(np.bincount(lengths, minlength=cap + 1), cap)
    opt = brute_force_optimum(lengths, cap)
    assert opt <= plan.num_packs <= (11 * opt) // 9 + 1  # BFD's proven bound
    assert plan_lengths(plan) == sorted(lengths)


@pytest.mark.parametrize("seed", range(60))
def test_histogram_bfd_equals_item_level_bfd(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.choice([8, 16, 33, 64, 100]))
    lengths = rng.integers(1, cap + 1, size=int(rng.integers(1, 300)))
    plan = plan_bfd(np.bincount(lengths, minlength=cap + 1), cap)
    ref = bfd_items(lengths.tolist(), cap)
    assert plan.num_packs == len(ref)
    assert sorted(sum(p) for p, c in zip(plan.patterns, plan.counts) for _ in range(int(c))) == sorted(map(sum, ref))
    assert plan_lengths(plan) == sorted(lengths.tolist())
    assert all(sum(p) <= cap for p in plan.patterns)


@pytest.mark.parametrize("seq_length", [2048, 4096, 8192])
def test_large_plan_within_a_thousandth_of_lower_bound(shared_data, seq_length):
    """10M lengths drawn from the shared data's length distribution (characters / 3.5 as a
    stand-in for tokens, scaled so every sample fits)."""
    rows = json.load(open(shared_data / "alpaca_en_demo.json")) + json.load(open(shared_data / "alpaca_zh_demo.json"))
    base = np.array([len(r["instruction"] + r["input"] + r["output"]) // 3 + 20 for r in rows])
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.choice(base, size=10_000_000), 1, seq_length)
    hist = np.bincount(lengths, minlength=seq_length + 1)
    plan = plan_bfd(hist, seq_length)
    lb = lower_bound(hist, seq_length)
    assert lb <= plan.num_packs <= int(np.ceil(1.001 * lb))
    assert int(plan.counts.sum()) == plan.num_packs
    assert plan.num_tokens == int(np.dot(np.arange(seq_length + 1), hist))


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        x = np.arange(n, dtype=np.uint64)
        y = permute(x, n, 99)
        assert sorted(y.tolist()) == list(range(n))
        assert np.array_equal(y, permute(x, n, 99))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_assignment_fills_every_slot_once_and_shuffles_within_length():
    rng = np.random.default_rng(3)
    S = 128
    lengths = rng.integers(1, 60, size=3000)
    plan = plan_bfd(np.bincount(lengths, minlength=S + 1), S)
    table = slot_table(plan)
    # rank of each sample among the samples of its length, in input order
    seen: dict[int, int] = {}
    ranks = []
    for L in lengths.tolist():
        ranks.append(seen.get(L, 0))
        seen[L] = ranks[-1] + 1
    ranks = np.array(ranks)
    pack, pos = assign_slots(table, lengths, ranks, seed=7)
    pairs = set(zip(pack.tolist(), pos.tolist()))
    assert len(pairs) == len(lengths)  # no slot used twice
    fill = np.zeros(plan.num_packs, np.int64)
    np.add.at(fill, pack, lengths)
    assert fill.max() <= S
    assert sorted(fill.tolist()) == sorted(sum(p) for p, c in zip(plan.patterns, plan.counts) for _ in range(int(c)))
    # same-length samples in input order do not land in consecutive packs in order
    L = np.bincount(lengths).argmax()
    same = pack[lengths == L]
    assert not np.all(np.diff(same) >= 0)
    # another seed gives another assignment, same seed the same
    assert not np.array_equal(assign_slots(table, lengths, ranks, seed=8)[0], pack)
    assert np.array_equal(assign_slots(table, lengths, ranks, seed=7)[0], pack)
