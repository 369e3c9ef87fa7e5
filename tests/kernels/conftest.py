"""Shared setup for kernel tests.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at conftest import. Tests marked `gpu` are skipped
without CUDA. Kernel tests pick their device with `kernel_device()`.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def kernel_device() -> str:
    """'cuda' when a GPU is there, else 'cpu' (kernels then run under TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
