"""The staleness bound of the RL loop (no Ray needed: the filter is a plain function)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwen35.rl.config import RLConfig
from qwen35.rl.loop import stale_masks


def _group(versions_per_sample):
    return [SimpleNamespace(versions=v, loss_mask=[True] * len(v), oldest_version=min(v), group=0)
            for v in versions_per_sample]


def test_the_staleness_bound():
    fresh = _group([[3, 3], [3, 4]])
    partial = _group([[2, 3, 4], [4]])  # a rollout that straddled two updates
    old = _group([[1, 1], [1, 2]])
    kept, masks, dropped = stale_masks([fresh, partial, old], version=4, k=1, policy="drop")
    assert kept == [fresh] and dropped == 2
    kept, masks, dropped = stale_masks([fresh, partial, old], version=4, k=1, policy="mask")
    assert kept == [fresh, partial] and dropped == 1
    assert masks[1] == [[False, True, True], [True]]  # the version-2 token is masked, the rest learn
    kept, _, dropped = stale_masks([fresh, partial, old], version=4, k=3, policy="drop")
    assert len(kept) == 3 and dropped == 0
    with pytest.raises(ValueError, match="stale_policy"):
        RLConfig(stale_policy="reweight").validate()
