"""Errors survive the trip from a worker process back to the parent (pickling)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from bids_cadiff.errors import (
    CheckpointError, InputError, OutputError, RegistrationError, UsageError,
)


@pytest.mark.parametrize("cls", [InputError, RegistrationError, CheckpointError, OutputError])
def test_path_errors_pickle_with_their_path_and_reason(cls) -> None:
    error = cls(Path("/data/sub-01_T1w.nii.gz"), "is 4D; split it")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert (back.path, back.reason, str(back)) == (error.path, error.reason, str(error))


def test_usage_errors_pickle() -> None:
    back = pickle.loads(pickle.dumps(UsageError("no T1w found")))
    assert type(back) is UsageError and str(back) == "no T1w found"
