"""Pytest setup: the host and the pack are loaded once, in-process, by the harness; every test
starts from random generators seeded by its own name, so its random inputs are the same each run."""

import random
import zlib

import harness  # noqa: F401  (loads ComfyUI and the pack)
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed torch's and Python's global generators from the test's id (fresh inputs per test and
    parameter, the same ones every run: a failure reproduces)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    return seed
