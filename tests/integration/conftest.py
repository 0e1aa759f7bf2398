"""Shared fixtures: a real moto S3 server on loopback (see tests/fixtures_s3.py), and a quiet
single-threaded torch for the training tests."""

from collections.abc import Iterator

import pytest
import torch
from fixtures_s3 import moto_s3, s3_bucket

__all__ = ["moto_s3", "one_torch_thread_no_metrics", "s3_bucket"]


@pytest.fixture
def one_torch_thread_no_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread (on a shared, busy CPU two spinning OpenMP threads run ~10x slower)
    and no metrics endpoint on 9400 unless a test asks for one."""
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
