"""The leak matcher's bounded-memory helpers give exactly what the numpy calls they replace give (np.unique's
first positions on sorted input, np.isin against a sorted unique array), edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from synthfactory.privacy.leak import _in_sorted, _run_starts


@pytest.mark.parametrize("n", [0, 1, 2, 50, 5000])
def test_helpers_equal_numpy(n):
    rng = np.random.default_rng(n)
    a = np.sort(rng.integers(0, max(1, n // 3), size=n).astype(np.uint64), kind="stable")
    vals, first = np.unique(a, return_index=True)
    assert np.array_equal(_run_starts(a), first) and np.array_equal(a[_run_starts(a)], vals)
    probe = rng.integers(0, max(2, n), size=n + 7).astype(np.uint64)
    probe[:3] = np.iinfo(np.uint64).max  # past the end of the sorted array
    for ref in (vals, vals[:0], vals[: max(1, len(vals) // 2)]):
        assert np.array_equal(_in_sorted(probe, ref), np.isin(probe, ref))
    assert _in_sorted(probe[:0], vals).shape == (0,)
