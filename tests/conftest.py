"""Shared test setup: CPU only, quiet, and a private cache so tests never touch ~/.cache."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run under the interpreter. It must be set before triton is
# imported anywhere, so it is set here, the first file pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "megasparse_cache"
    monkeypatch.setenv("MEGASPARSE_CACHE", str(cache))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or long-running")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
