"""bench/cli_latency.py's run order: every series right after every other one equally often.

The figures it prints are only comparable if no series always follows the same (heavy or
light) predecessor; this pins the design that guarantees it.
"""

from collections import Counter
from itertools import pairwise

import pytest

from bench.cli_latency import balanced_orders


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_each_series_follows_each_other_equally_often(n: int) -> None:
    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    pairs = Counter((a, b) for row in rows for a, b in pairwise(row))
    wanted = {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(pairs) == wanted
    assert len(set(pairs.values())) <= 1  # the same count for every ordered pair


def test_a_rotated_cycle_would_not_do() -> None:
    # what the bench did before (0 1 2 3, 1 2 3 0, ...): 1 always right after 0, 2 never
    rotated = [[(x + r) % 4 for x in range(4)] for r in range(4)]
    pairs = Counter((a, b) for row in rotated for a, b in pairwise(row))
    assert pairs[(0, 1)] == 3 and pairs[(0, 2)] == 0
