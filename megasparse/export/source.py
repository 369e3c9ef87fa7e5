"""Read a megasparse training checkpoint as full (tp=1) weights, its model config and its facts.

Any TP degree: the `mp_rank_XX_model_states.pt` files of every TP rank are merged with the
sharding recorded in megasparse.json, exactly as `megasparse convert` does (train/convert.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megasparse.config import ModelConfig
from megasparse.errors import CheckpointError, ConfigError
from megasparse.export.materialize import check_state
from megasparse.train.checkpoint import LATEST, META, read_meta, resolve_resume


@dataclass
class SourceCheckpoint:
    folder: str            # the step folder
    meta: dict             # its megasparse.json
    model: ModelConfig
    state: dict            # our parameter names -> full tensors (CPU)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def tokenizer_hash(self) -> str | None:
        return self.meta.get("tokenizer_hash")

    @property
    def data_config(self) -> dict:
        return dict(self.meta["config"].get("data") or {})


def locate(path: str) -> tuple[str, str]:
    """(checkpoints folder, tag) for a step folder, a checkpoints folder (its `latest`), or a run
    directory holding `checkpoints/`."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; give a run directory, its checkpoints folder "
                              f"(its '{LATEST}' is used) or one step folder such as checkpoints/step00000100")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a file; give a run directory, its checkpoints folder or a "
                              f"step folder inside it")
    nested = os.path.join(path, "checkpoints")
    if not os.path.isfile(os.path.join(path, META)) and not os.path.isfile(os.path.join(path, LATEST)) \
            and os.path.isdir(nested):
        path = nested   # a run directory
    if not os.path.isfile(os.path.join(path, META)) and not os.path.isfile(os.path.join(path, LATEST)):
        raise CheckpointError(f"{path} is not a megasparse checkpoint: it holds neither '{LATEST}' nor '{META}' "
                              f"(nor a checkpoints/ folder); point at a run's checkpoints folder or a complete "
                              f"step folder inside it")
    found = resolve_resume(path, path)
    assert found is not None   # resolve_resume returns None only for resume=None
    return found


def model_file(folder: str, tp_rank: int) -> str:
    return os.path.join(folder, f"mp_rank_{tp_rank:02d}_model_states.pt")


def _load_shard(path: str) -> dict:
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:   # truncated zip, pickle errors, ...: all mean a damaged file
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is corrupt: "
                              f"export an earlier step folder") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        raise CheckpointError(f"{path} holds no model state dict ('module'); it is not a megasparse/DeepSpeed "
                              f"model-states file")
    return saved["module"]


def load_source(path: str) -> SourceCheckpoint:
    from megasparse.config import config_from_dict
    from megasparse.train.convert import merge_shards

    load_dir, tag = locate(path)
    folder = os.path.join(load_dir, tag)
    meta = read_meta(load_dir, tag)
    if meta.get("zero_stage") == 3:
        raise CheckpointError(f"{folder} is a ZeRO-3 checkpoint: its weights live in the optimizer shards; "
                              f"consolidate it first with the zero_to_fp32.py script DeepSpeed saved beside it")
    try:
        model_cfg = config_from_dict(meta["config"]).model
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{folder}/{META} records no valid config ({err}); it was not written by "
                              f"`megasparse train`") from err
    tp = int(meta.get("tp", 1))
    files = [model_file(folder, r) for r in range(tp)]
    present = [f for f in files if os.path.isfile(f)]
    if not present:
        raise CheckpointError(f"{folder} holds no model files (mp_rank_00_model_states.pt ...); the save was "
                              f"incomplete or the files were moved: export another step folder")
    for f in files:
        if f not in present:
            raise CheckpointError(f"{f} is missing: {folder} was saved at tp={tp} and needs all {tp} model shards")
    try:
        state = merge_shards([_load_shard(f) for f in files], meta.get("shards", {}))
    except KeyError as err:
        raise CheckpointError(f"{folder}: the model shards do not hold the same parameters ({err} is missing from "
                              f"one); the checkpoint is damaged: export another step folder") from err
    check_state(state, model_cfg, folder)
    return SourceCheckpoint(folder=folder, meta=meta, model=model_cfg, state=state)
