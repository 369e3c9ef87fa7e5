"""`export_checkpoint`: a training checkpoint -> a Hugging Face Llama folder (docs/export.md).

Steps: read and merge the checkpoint (source.py); find its tokenizer and check it against the
hash the trainer recorded; optionally calibrate and sort each sparse layer's neurons
(calibrate.py); rename to HF names (hf_format.py); write config.json, model.safetensors and
tokenizer.model into OUT.tmp-<pid>, fsync, and rename it to OUT. A failed export leaves no OUT.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

import torch

from megasparse.errors import CheckpointError, ConfigError, DataError
from megasparse.export.calibrate import CALIBRATION_TOKENS, calibrate_and_permute, read_calibration_tokens
from megasparse.export.hf_format import (CONFIG_FILE, DTYPE_NAMES, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE,
                                         hf_config, parse_dtype, to_hf_names)
from megasparse.export.source import SourceCheckpoint, load_source
from megasparse.train.checkpoint import fsync_tree


@dataclass
class ExportResult:
    out_dir: str
    config: dict           # what config.json holds
    step: int

    @property
    def calibration(self) -> dict | None:
        return self.config["megasparse"]["calibration"]


def _check_out_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"OUT_DIR {out} is a file; choose a folder (new or empty), or remove the file")
        if os.listdir(out) and not overwrite:
            raise ConfigError(f"OUT_DIR {out} exists and is not empty; pass --overwrite to replace it, or choose "
                              f"another folder")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but CUDA is not available here; use --device cpu (or auto)")
    return dev


def resolve_tokenizer(src: SourceCheckpoint, override: str | None):
    """The tokenizer to ship: --tokenizer, else the one the run used (data.tokenizer, the data
    directory's tokenizer.model, or the cached demo tokenizer), checked against the recorded hash."""
    from megasparse.data.tokenizer import Tokenizer, demo_tokenizer

    data = src.data_config
    if override is not None:
        path = os.path.join(override, TOKENIZER_FILE) if os.path.isdir(override) else override
        if not os.path.isfile(path):
            raise DataError(f"--tokenizer {override}: no such file; pass the sentencepiece .model the run used")
        where = f"--tokenizer {path}"
        tokenizer = Tokenizer(path)
    elif data.get("tokenizer") or data.get("path"):
        key = "data.tokenizer" if data.get("tokenizer") else "data.path"
        path = data["tokenizer"] if key == "data.tokenizer" else os.path.join(data["path"], TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f"the checkpoint's {key}={data[key.split('.')[1]]} names tokenizer {path}, which does not "
                            f"exist here; pass --tokenizer PATH with the sentencepiece .model the run used")
        where = f"{path} (the checkpoint's {key})"
        tokenizer = Tokenizer(path)
    else:
        tokenizer = demo_tokenizer(src.model.vocab_size)   # deterministic: rebuilt identically if not cached
        where = f"{tokenizer.path} (the demo tokenizer the run used)"
    if src.tokenizer_hash and tokenizer.sha256 != src.tokenizer_hash:
        raise DataError(f"tokenizer {where} has sha256 {tokenizer.sha256[:12]}..., but checkpoint {src.folder} was "
                        f"trained with a tokenizer of sha256 {src.tokenizer_hash[:12]}...; pass --tokenizer with "
                        f"the sentencepiece .model the run used (its data.tokenizer, or tokenizer.model inside its "
                        f"data.path)")
    if tokenizer.vocab_size > src.model.vocab_size:
        raise DataError(f"tokenizer {where} has vocab size {tokenizer.vocab_size} > the model's vocab_size "
                        f"{src.model.vocab_size}: its ids would index past the embedding; pass the tokenizer "
                        f"the run used")
    return tokenizer


def _special_ids(tokenizer) -> dict:
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    return {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}


def _unshared(tensors: dict, dtype: torch.dtype) -> dict:
    """Contiguous tensors in dtype that share no storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to(dtype=dtype, device="cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write(tmp: str, tensors: dict, config: dict, tokenizer_path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    # safetensors creates its file owner-only (0600); give it the umask's mode like the others
    shutil.copymode(os.path.join(tmp, CONFIG_FILE), os.path.join(tmp, WEIGHTS_FILE))
    shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))
    fsync_tree(tmp)


def _check_finite(state: dict, tensors: dict, dtype: torch.dtype, folder: str) -> None:
    """A NaN or inf weight exports a model that computes NaN, and a cast to fp16 turns values past
    its range (+-65504) into inf: refuse either, naming the tensor."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{folder}: {name} holds NaN or inf values (the training diverged by this step); "
                                  f"export an earlier step folder")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name} exceeds the range of {DTYPE_NAMES[dtype]} (fp16 holds at most +-65504); "
                                  f"export with --dtype bf16 or fp32")


def _publish(tmp: str, out: str) -> None:
    """Rename tmp to out; an old out (--overwrite) is moved aside first and removed after."""
    old = None
    if os.path.isdir(out):
        if os.listdir(out):
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
        else:
            os.rmdir(out)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)   # put the previous export back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: str, out_dir: str, *, calibration_data: str | None = None,
                      calibration_tokens: int = CALIBRATION_TOKENS, tokenizer: str | None = None,
                      device: str = "auto", dtype: str = "auto", overwrite: bool = False, log=print) -> ExportResult:
    """Export a megasparse training checkpoint (any TP degree) as a Hugging Face Llama folder.

    checkpoint: a step folder, a checkpoints folder (its `latest`) or a run directory.
    calibration_data: a `megasparse data preprocess` folder; when given, each relu_gated layer's
        neurons are sorted most-popular-first over `calibration_tokens` tokens and the twell n_hot
        is recorded (calibrate.py). dtype: bf16 | fp32 | fp16 | auto (the checkpoint's own).
    """
    from megasparse import __version__

    out = os.path.abspath(out_dir.rstrip(os.sep) or out_dir)
    _check_out_dir(out, overwrite)
    export_dtype = None if dtype == "auto" else parse_dtype(dtype)
    dev = resolve_device(device)
    if calibration_data is not None and not os.path.isdir(calibration_data):
        raise DataError(f"--calibration-data {calibration_data} does not exist or is not a directory; give the "
                        f"output folder of `megasparse data preprocess`")
    src = load_source(checkpoint)
    real_src, real_out = os.path.realpath(src.folder), os.path.realpath(out)
    if real_src == real_out or real_src.startswith(real_out + os.sep):
        raise ConfigError(f"OUT_DIR {out} holds the checkpoint being exported; choose another folder")
    cfg = src.model
    if calibration_data is not None and cfg.mlp != "relu_gated":
        raise ConfigError(f"--calibration-data sorts the neurons of relu_gated layers by how often they fire; "
                          f"{src.folder} has model.mlp={cfg.mlp} (dense, nothing to sort): export it without "
                          f"--calibration-data")
    tok = resolve_tokenizer(src, tokenizer)
    stored = next(t.dtype for t in src.state.values() if t.is_floating_point())
    export_dtype = export_dtype or stored
    state, calibration = src.state, None
    if calibration_data is not None:
        data_cfg = src.data_config
        seq_len = min(int(data_cfg.get("seq_len") or cfg.max_seq_len), cfg.max_seq_len)
        data = read_calibration_tokens(calibration_data, calibration_tokens, seq_len, tok.sha256, cfg.vocab_size)
        calib_dtype = torch.float32 if dev.type == "cpu" else stored
        state, calibration = calibrate_and_permute(cfg, state, data, dev, calib_dtype, log=log)
    megasparse = {
        "format_version": FORMAT_VERSION,
        "megasparse_version": __version__,
        "source_checkpoint": src.folder,
        "source_step": src.step,
        "source_tp": int(src.meta.get("tp", 1)),
        "trained_with_version": src.meta.get("megasparse_version"),
        "tokenizer_sha256": tok.sha256,
        "model": dataclasses.asdict(cfg),
        "neuron_order": "by_fire_count" if calibration else "as_trained",
        "calibration": calibration,
    }
    config = hf_config(cfg, export_dtype, _special_ids(tok), megasparse)
    tensors = _unshared(to_hf_names(state, cfg.mlp), export_dtype)
    _check_finite(state, tensors, export_dtype, src.folder)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        _write(tmp, tensors, config, tok.path)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}: LlamaForCausalLM (hidden_act {config['hidden_act']}, {cfg.n_layers} layers, "
        f"{DTYPE_NAMES[export_dtype]}) from step {src.step} of {src.folder}")
    return ExportResult(out_dir=out, config=config, step=src.step)
