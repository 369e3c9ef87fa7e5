"""Carry Adam moments through `megasparse convert`: reshard a DeepSpeed universal checkpoint.

DeepSpeed's `ds_to_universal` turns ZeRO-1/2 partitions into one folder per parameter
(`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`), each tensor the
concatenation of every TP rank's shard along `cat_dim`. Its loader gives TP rank r of a run
at degree T the r-th of T equal chunks along `cat_dim`. Our layout is not always that: K/V
projections are replicated over consecutive ranks when tp > n_kv_heads, and the converter
concatenates the copies. So each tensor is cut back into the source ranks' shards, merged
into the full tensor with our own sharding rules (merge_shards), split for the new degree
(split_full), and concatenated again: the loader's equal chunks are then exactly our shards.
Parameters that are not sharded (norms) are stored once, and the loader copies them.
"""
from __future__ import annotations

import os
import shutil

import torch

from megasparse.errors import CheckpointError

STATE_FILES = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")


def _reshard(name: str, entry: dict, info: dict, tp_src: int, tp_dst: int, n_kv_heads: int) -> dict:
    from megasparse.train.convert import merge_shards, split_full

    dim = info["dim"]
    if entry.get("cat_dim", dim) != dim:
        raise CheckpointError(f"{name}: the universal checkpoint concatenated TP shards along dim "
                              f"{entry['cat_dim']}, but megasparse.json records dim {dim}")
    pieces = entry["param"].chunk(tp_src, dim=dim)
    full = merge_shards([{name: p} for p in pieces], {name: info})[name]
    shards = split_full({name: full}, {name: info}, tp_dst, n_kv_heads)
    return {**entry, "param": torch.cat([s[name] for s in shards], dim=dim), "cat_dim": dim}


def reshard_universal(src: str, dst: str, shard_info: dict, tp_src: int, tp_dst: int, n_kv_heads: int) -> None:
    """Write `dst/zero/` from the universal checkpoint folder `src` for tensor-parallel degree tp_dst.
    `shard_info` is megasparse.json's "shards" of the source (replicas at tp_src)."""
    zero_src, zero_dst = os.path.join(src, "zero"), os.path.join(dst, "zero")
    os.makedirs(zero_dst, exist_ok=True)
    shutil.copy2(os.path.join(zero_src, "optimizer_state.pt"), os.path.join(zero_dst, "optimizer_state.pt"))
    for name in sorted(os.listdir(zero_src)):
        folder = os.path.join(zero_src, name)
        if not os.path.isdir(folder):
            continue
        os.makedirs(os.path.join(zero_dst, name), exist_ok=True)
        for file in sorted(os.listdir(folder)):
            path, out = os.path.join(folder, file), os.path.join(zero_dst, name, file)
            info = shard_info.get(name)
            if file not in STATE_FILES or info is None:
                shutil.copy2(path, out)       # the step counter, and tensors every rank holds whole
                continue
            entry = torch.load(path, map_location="cpu", weights_only=False)
            torch.save(_reshard(name, entry, info, tp_src, tp_dst, n_kv_heads), out)
