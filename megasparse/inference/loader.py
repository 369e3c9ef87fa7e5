"""Load an exported folder (or a plain HF Llama with hidden_act relu or silu) as a SparseLlama.

An export calibrated at export time (docs/export.md) records each layer's `twell_n_hot`; its
neurons are already sorted most-popular-first, so each sparse layer's TwELL layout is preset to
that n_hot (twell_layout.preset_hot) and never calibrates at run time.
"""
from __future__ import annotations

import dataclasses
import json
import os

from megasparse.errors import CheckpointError, ConfigError, DataError
from megasparse.export.hf_format import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, from_hf_names,
                                         model_config_from_hf, parse_dtype)
from megasparse.export.materialize import model_from_state

_BACKENDS = ("auto", "torch", "twell", "hybrid")


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; give the OUT_DIR of `megasparse export` (or a Hugging "
                              f"Face Llama folder)")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} does not exist: {path} is not an exported model; run "
                              f"`megasparse export CHECKPOINT {path}`")
    try:
        with open(file) as fh:
            return json.load(fh)
    except ValueError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); re-export the model") from err


def _load_file(file: str, device) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(file, device=str(device))
    except Exception as err:   # SafetensorError, OSError, ...: a truncated or damaged file
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                              f"corrupt: re-export the model") from err


def read_weights(path: str, device="cpu") -> dict:
    """HF-named tensors of model.safetensors, or of every shard a model.safetensors.index.json lists."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return _load_file(single, device)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from err
        tensors = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} (listed in {WEIGHTS_INDEX_FILE}) is missing; restore it or "
                                      f"re-export the model")
            tensors.update(_load_file(file, device))
        return tensors
    raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}: the export is incomplete or the file was removed; "
                          f"re-export it with `megasparse export CHECKPOINT {path} --overwrite`")


def load_pretrained(path: str, device="cpu", dtype=None, mlp_backend: str = "auto", track_stats: bool = True):
    """An exported folder -> SparseLlama in eval mode on `device`.

    track_stats=False: the torch MLP path computes y only, as a dense inference would (no L1 term,
    fire counts or nnz per token in the model's output); for serving. The twell path never
    computes them.

    dtype: None keeps the stored dtype; else bf16 / fp32 / fp16 (or a torch dtype).
    mlp_backend: model.mlp_backend for the sparse layers (auto: twell on CUDA without grad, torch
    otherwise; see model/sparse_mlp.py). Layers with a recorded twell_n_hot use it directly.
    """
    if mlp_backend not in _BACKENDS:
        raise ConfigError(f"mlp_backend={mlp_backend!r} is not one of {list(_BACKENDS)}")
    config = read_config(path)
    where = os.path.join(path, CONFIG_FILE)
    cfg = dataclasses.replace(model_config_from_hf(config, where), mlp_backend=mlp_backend,
                              activation_checkpointing=False)
    tensors = read_weights(path, device)
    state = from_hf_names(tensors, cfg.mlp, cfg.tie_embeddings, os.path.join(path, WEIGHTS_FILE))
    model = model_from_state(cfg, state, device, None if dtype is None else parse_dtype(dtype))
    for layer in model.layers:
        if hasattr(layer.mlp, "track_stats"):
            layer.mlp.track_stats = track_stats
    n_hot = recorded_n_hot(config, cfg, where)
    if n_hot is not None and cfg.mlp == "relu_gated":
        for layer, n in zip(model.layers, n_hot):
            # neurons are already most-popular-first: the layout takes the first n as they stand
            layer.mlp._twell_layout.preset_hot(n)
    return model.eval()


def recorded_n_hot(config: dict, cfg, where: str) -> list[int] | None:
    """Per-layer twell n_hot recorded at export time, or None (uncalibrated export, or plain HF)."""
    calibration = (config.get("megasparse") or {}).get("calibration")
    if not calibration:
        return None
    values = [layer.get("twell_n_hot") for layer in calibration.get("layers") or []]
    tile = calibration.get("twell_tile") or 1
    ok = all(isinstance(v, int) and 0 <= v <= cfg.ffn_hidden and v % tile == 0 for v in values)
    if len(values) != cfg.n_layers or not ok:
        raise ConfigError(f"{where}: megasparse.calibration.layers must give, for each of the {cfg.n_layers} layers, "
                          f"a twell_n_hot in [0, {cfg.ffn_hidden}] that is a multiple of twell_tile={tile}; got "
                          f"{values}: re-export the model")
    return values


def load_tokenizer(path: str):
    """The sentencepiece processor of an exported folder (its tokenizer.model)."""
    import sentencepiece as spm

    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
        raise DataError(f"{file} does not exist; `megasparse export` copies the tokenizer there (re-export, or "
                        f"copy the run's own sentencepiece .model to it)")
    recorded = (_config_if_any(path).get("megasparse") or {}).get("tokenizer_sha256")
    if recorded:
        from megasparse.data.tokenizer import file_sha256

        actual = file_sha256(file)
        if actual != recorded:
            raise DataError(f"{file} has sha256 {actual[:12]}..., but the model was exported with a tokenizer of "
                            f"sha256 {recorded[:12]}... (config.json); the token ids would not be the model's. "
                            f"Put the run's own tokenizer back (re-export the model to get it)")
    try:
        return spm.SentencePieceProcessor(model_file=file)
    except (OSError, RuntimeError) as err:
        raise DataError(f"{file} is not a valid sentencepiece model ({err}); re-export the model") from err


def _config_if_any(path: str) -> dict:
    """config.json of the folder, or {} when it has none (a bare tokenizer folder)."""
    return read_config(path) if os.path.isfile(os.path.join(path, CONFIG_FILE)) else {}

