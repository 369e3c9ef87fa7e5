"""Whether Triton kernels run under its CPU interpreter. Kept free of any Triton import, so that
packages whose CPU path needs no Triton (kernels.cross_entropy) can ask it too."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests): kernels then upcast tl.dot operands to fp32,
    because the interpreter's bf16 dot gives garbage, and use a single launch config."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
