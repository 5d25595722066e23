"""Sizing of the tokenizer actor pool (pure: no cluster)."""

import pytest

from raysft.engine.session import size_pool


@pytest.mark.parametrize(
    ("cpus", "workers", "expect"),
    [
        (2, None, (2, 1, 0.5)),  # one single-threaded actor per core, 1 CPU left for Ray
        (1, None, (1, 1, 0.5)),
        (16, None, (16, 1, 0.9375)),
        (2, 1, (1, 2, 1.0)),  # fewer actors than cores: each encodes with its share
        (8, 2, (2, 4, 3.5)),
        (3, None, (3, 1, 0.6666)),  # Ray takes resource amounts to 4 decimals
        (2, 4, (4, 1, 0.25)),
    ],
)
def test_pool_leaves_a_cpu_and_uses_every_core(cpus, workers, expect):
    pool = size_pool(cpus, workers)
    assert (pool.workers, pool.threads, pool.actor_cpus) == expect
    assert pool.workers * pool.actor_cpus <= max(cpus - 1, cpus / 2)
    # one statistics task fits beside the actors, and only one: it takes the CPU they leave
    assert 0 < pool.stats_cpus <= 1
    assert pool.workers * pool.actor_cpus + pool.stats_cpus <= cpus
    assert pool.workers * pool.actor_cpus + 2 * pool.stats_cpus > cpus or pool.stats_cpus == 1


def test_no_more_actors_than_chunks():
    assert size_pool(2, None, chunks=1) == size_pool(2, 1)  # one actor, encoding with both cores
    assert size_pool(16, 8, chunks=3).workers == 3
