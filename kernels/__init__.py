"""Triton kernels for sparse ReLU-gated FFNs.

Nothing in this package imports ``megasparse``: the library picks a backend through the single
dispatch point in ``megasparse/model/sparse_mlp.py``. See ``kernels/README.md`` for the contract
each backend honours.
"""
