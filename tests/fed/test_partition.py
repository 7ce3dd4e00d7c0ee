import math
from collections import Counter

import pytest

from peftlab.fed.partition import by_group, describe, dirichlet, iid, parse_partition, split


def _is_partition(parts, n):
    flat = sorted(i for p in parts for i in p)
    return flat == list(range(n)) and all(parts)


def test_iid_covers_every_row_once_in_near_equal_parts():
    parts = iid(103, 4, seed=1)
    assert _is_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == iid(103, 4, seed=1) and parts != iid(103, 4, seed=2)


def _mean_entropy(parts, labels):
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    total = 0.0
    for p in parts:
        counts = Counter(labels[i] for i in p)
        n = len(p)
        total -= sum(c / n * math.log(c / n) for c in counts.values())
    return total / len(parts)


def test_dirichlet_skews_labels_more_as_alpha_shrinks():
    labels = [i % 8 for i in range(4000)]  # 8 balanced labels
    skewed, mild = dirichlet(labels, 8, alpha=0.1, seed=0), dirichlet(labels, 8, alpha=100.0, seed=0)
    assert _is_partition(skewed, 4000) and _is_partition(mild, 4000)
    # alpha 100 is close to IID: every client sees nearly all 8 labels evenly (entropy ~ ln 8 = 2.08).
    assert _mean_entropy(mild, labels) > 2.0
    assert _mean_entropy(skewed, labels) < 1.2
    assert dirichlet(labels, 8, alpha=0.1, seed=0) == skewed


def test_dirichlet_redraws_until_no_client_is_empty_and_fails_clearly():
    labels = [0] * 5 + [1] * 5
    parts = dirichlet(labels, 5, alpha=0.5, seed=3)
    assert _is_partition(parts, 10)
    with pytest.raises(ValueError, match="larger alpha or fewer clients"):
        dirichlet([0] * 4, 2, alpha=1e-3, seed=0)  # one label, nearly all of it to one client, every draw


def test_by_group_keeps_groups_together_and_balances_sizes():
    groups = ["a"] * 6 + ["b"] * 3 + ["c"] * 3 + ["d"] * 2
    parts = by_group(groups, 2)
    assert _is_partition(parts, len(groups))
    owner = {g: next(c for c, p in enumerate(parts) if i in p) for i, g in enumerate(groups)}
    for i, g in enumerate(groups):
        assert i in parts[owner[g]]
    # Largest first, each to the smaller client: a (6) -> 0, b (3) -> 1, c (3) -> 1, d (2) -> 0 (tie: lowest).
    assert [sorted({groups[i] for i in p}) for p in parts] == [["a", "d"], ["b", "c"]]
    with pytest.raises(ValueError, match="fewer than the 5 clients"):
        by_group(groups, 5)


def test_parse_and_split():
    assert str(parse_partition("dirichlet:0.5")) == "dirichlet:0.5"
    assert parse_partition("by:user").field == "user"
    for bad in ("dirichlet", "dirichlet:0", "random", "by:"):
        with pytest.raises(ValueError, match="partition"):
            parse_partition(bad)
    rows = [{"user": u} for u in "aabbc"]
    assert split(parse_partition("by:user"), rows, 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="no classification labels"):
        split(parse_partition("dirichlet:1"), rows, 2)
    with pytest.raises(ValueError, match="no field 'lang'"):
        split(parse_partition("by:lang"), rows, 2)
    assert describe([[0, 1], [2]], labels=["x", "x", "y"]) == ["client 0: 2 rows (x: 2)", "client 1: 1 rows (y: 1)"]
