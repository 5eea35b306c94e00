"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# The suite is reproducible: hypothesis draws the same examples on every run (a CI result never depends on the
# draw). HYPOTHESIS_PROFILE=explore draws fresh random examples, to search for new counterexamples.
settings.register_profile("repro", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add synchronisation (much slower on a busy 2-core machine).

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
