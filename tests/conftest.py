"""Shared fixtures. torch is imported inside them, so collecting the torch-free tests stays
torch-free."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_fp32_one_thread():
    """fp32 default dtype and one intra-op thread for the test, restored after: intra-op
    threads spin under the shared 2-core CI load (one thread is ~10x faster there)."""
    import torch

    prev_dtype, prev_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(prev_dtype)
    torch.set_num_threads(prev_threads)
