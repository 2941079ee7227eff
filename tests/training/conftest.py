"""Training tests run single-threaded: on a shared 2-core machine, torch's default thread pool
makes tiny models tens of times slower through contention."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
