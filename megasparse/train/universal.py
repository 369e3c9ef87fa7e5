"""Resume at another data-parallel degree through DeepSpeed's universal checkpoints.

ZeRO-1/2 save optimizer state as flat per-DP-rank partitions, and DeepSpeed refuses to load
them at another DP degree. Its `ds_to_universal` converter rewrites a checkpoint as
per-parameter files (fp32 weight, Adam moments), which an engine built with
`checkpoint.load_universal` re-partitions for any DP degree. The converter needs to know how
parameters are split over TP; `universal_info` describes our layout in its vocabulary.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from deepspeed.checkpoint import constants as C

from megasparse.errors import CheckpointError
from megasparse.train.checkpoint import UNIVERSAL_SUFFIX

UNIVERSAL_COMPLETE = ".complete"   # written last into a finished universal folder


_REPLICATED = [r".*norm\.weight$"]
_ROW_PARALLEL = [r".*o_proj\.weight$", r".*down_weight$", r".*down_proj\.weight$"]


def universal_info(param_names: list[str]) -> dict:
    """Our TP layout for the converter: norms are replicated, the output and down projections
    are split along their input (row-parallel), everything else along dim 0 (column-parallel,
    vocab-parallel embedding and LM head). The converter rejects patterns that match nothing,
    so only those that match this model's parameters are listed."""
    def used(patterns):
        return [p for p in patterns if any(re.match(p, name) for name in param_names)]

    return {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: used(_REPLICATED),
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: used(_ROW_PARALLEL),
    }


def ensure_universal(load_dir: str, tag: str, rank: int) -> str:
    """Convert `load_dir/tag` once (rank 0, cached beside it) and return the universal tag."""
    import torch.distributed as dist

    out_tag = tag + UNIVERSAL_SUFFIX
    out = os.path.join(load_dir, out_tag)
    done = os.path.join(out, UNIVERSAL_COMPLETE)
    if rank == 0 and not os.path.isfile(done):
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(load_dir, tag), "--output_folder", out, "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"converting {os.path.join(load_dir, tag)} to a universal checkpoint failed "
                                  f"(needed to resume at another DP degree):\n{proc.stderr[-2000:]}\n"
                                  f"resume at the saved DP degree, or set train.reset_optimizer_on_resume=true")
        open(done, "w").close()
    if dist.is_initialized():
        dist.barrier()
    return out_tag
