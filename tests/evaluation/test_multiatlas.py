"""Majority-vote label fusion."""

from __future__ import annotations

import numpy as np
import pytest

from bids_cadiff.evaluation.multiatlas import majority_vote


def test_majority_vote_prefers_the_most_frequent_then_lowest():
    maps = [np.array([[1, 2], [0, 3]]), np.array([[1, 2], [3, 0]]), np.array([[2, 1], [3, 1]])]
    assert majority_vote(maps, 4).tolist() == [[1, 2], [3, 0]]


def test_majority_vote_rejects_no_maps_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([], 2)
    with pytest.raises(ValueError, match="differ in shape"):
        majority_vote([np.zeros((2, 2), int), np.zeros((2, 3), int)], 2)
