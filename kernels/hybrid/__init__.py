"""Hybrid (cold ELL + dense backups) sparse training kernels: see kernels/README.md and format.py."""
from .function import (DEFAULT_ELL_WIDTH, DEFAULT_HOT_FRAC, SparseGatedMLPFunction,  # noqa: F401
                       sparse_gated_mlp, sparse_gated_mlp_reference)
from .format import HybridPattern, build_pattern  # noqa: F401
