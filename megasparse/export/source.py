"""Read a megasparse training checkpoint as full (tp=1) weights, its model config and its facts.

Any TP degree and ZeRO stage: every TP rank's weights are read (ZeRO-3's consolidated from its
optimizer shards) and merged with the sharding recorded in megasparse.json, exactly as
`megasparse convert` does (train/convert.py).
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


def load_source(path: str) -> SourceCheckpoint:
    from megasparse.config import config_from_dict
    from megasparse.train.convert import load_shards, merge_shards

    load_dir, tag = locate(path)
    folder = os.path.join(load_dir, tag)
    meta = read_meta(load_dir, tag)
    try:
        model_cfg = config_from_dict(meta["config"]).model
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{folder}/{META} records no valid config ({err}); it was not written by "
                              f"`megasparse train`") from err
    shards = load_shards(folder, meta)
    try:
        state = merge_shards([saved["module"] for saved in shards], meta.get("shards", {}))
    except KeyError as err:
        raise CheckpointError(f"{folder}: the model shards do not hold the same parameters ({err} is missing from "
                              f"one); the checkpoint is damaged: export another step folder") from err
    check_state(state, model_cfg, folder)
    return SourceCheckpoint(folder=folder, meta=meta, model=model_cfg, state=state)
