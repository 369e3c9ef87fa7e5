"""megasparse: pretraining sparse (ReLU-gated, L1-regularised) transformer language models."""

__version__ = "0.1.0"
