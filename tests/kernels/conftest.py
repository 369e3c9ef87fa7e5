"""Kernel-test helpers. The interpreter switch (TRITON_INTERPRET=1 without CUDA) and the `gpu`
marker live in tests/conftest.py, which pytest loads first."""
import torch


def kernel_device() -> str:
    """'cuda' when a GPU is there, else 'cpu' (kernels then run under TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
