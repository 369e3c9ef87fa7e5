"""Export-time conversion of the sparse layers' weight layout (issue #5): neurons most-popular-first.

The model runs (torch backend, no grad) over calibration tokens from a `megasparse data
preprocess` directory, and each relu_gated layer's fires are counted per neuron (the forward
returns them). Each layer's hidden neurons are then permuted most-popular-first: rows of gate and
up, columns of down. y = down(relu(gate x) * up x) is a sum over neurons, so the function is
unchanged (up to the order of a floating-point sum). The TwELL kernels run their first n_hot
neurons through dense GEMMs; with the neurons already sorted, an inference runtime takes the
first `twell_n_hot` as they stand and never calibrates at run time (twell_layout.preset_hot).

`twell_n_hot` is whatever kernels.twell.calibrate picks for the measured fire counts (its rule:
neurons firing on more than 0.6% of tokens, rounded up to a whole tile), called as is so that
the export and the runtime can never disagree about the rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megasparse.config import ModelConfig
from megasparse.errors import ConfigError, DataError

CALIBRATION_TOKENS = 8192
BATCH_TOKENS = 16384      # tokens per forward (memory: the logits are [batch, seq, vocab])


@dataclass
class CalibrationData:
    path: str
    split: str
    seq_len: int
    sequences: list        # 1-D int64 tensors of at most seq_len tokens, in stream order

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def read_calibration_tokens(path: str, n_tokens: int, seq_len: int, tokenizer_sha256: str,
                            vocab_size: int) -> CalibrationData:
    """The first n_tokens of the directory's valid split (train when valid cannot fill one sequence),
    cut into sequences of seq_len. Fewer tokens than asked is allowed (all of them are used)."""
    from megasparse.data.shards import open_preprocessed

    if n_tokens < 1:
        raise ConfigError(f"--calibration-tokens={n_tokens} must be at least 1 (the default is {CALIBRATION_TOKENS})")
    try:   # (export_checkpoint has checked that the folder exists, before loading the checkpoint)
        data = open_preprocessed(path)
    except DataError as err:
        raise DataError(f"--calibration-data {path}: {err}") from err
    meta = data.metadata
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"--calibration-data {path} was tokenized with a tokenizer of sha256 "
                        f"{meta['tokenizer_sha256'][:12]}..., but the model's tokenizer has sha256 "
                        f"{tokenizer_sha256[:12]}...; preprocess the calibration text with the model's tokenizer "
                        f"(`megasparse data preprocess --tokenizer` with the exported tokenizer.model)")
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"--calibration-data {path} has vocab size {meta['vocab_size']} > model.vocab_size="
                        f"{vocab_size}; preprocess it with the model's tokenizer")
    split = "valid" if data.splits["valid"].num_tokens >= seq_len else "train"
    stream = data.splits[split]
    total = min(n_tokens, stream.num_tokens)
    if total < 1:
        raise DataError(f"--calibration-data {path} holds no tokens; preprocess some text into it")
    sequences = []
    for start in range(0, total, seq_len):
        window = stream.read(start, min(seq_len, total - start))
        sequences.append(torch.from_numpy(window.astype("int64")))
    return CalibrationData(path=os.path.abspath(path), split=split, seq_len=seq_len, sequences=sequences)


@torch.no_grad()
def count_fires(model, data: CalibrationData, device: torch.device) -> list[torch.Tensor]:
    """Per layer: int64 [H] tokens on which each neuron's gate fired (g > 0)."""
    per_batch = max(1, BATCH_TOKENS // data.seq_len)
    totals = None
    seqs = data.sequences
    i = 0
    while i < len(seqs):
        # sequences of one length go together (only the last one may be shorter)
        batch = [seqs[i]]
        while len(batch) < per_batch and i + len(batch) < len(seqs) and len(seqs[i + len(batch)]) == len(batch[0]):
            batch.append(seqs[i + len(batch)])
        i += len(batch)
        out = model(torch.stack(batch).to(device))
        counts = [c.to(torch.int64).cpu() for c in out.fire_counts]
        totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
    return totals


def twell_n_hot(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, fires: torch.Tensor,
                tokens: int) -> tuple[int, int]:
    """(n_hot, tile) that kernels.twell.calibrate picks for a layer whose neurons are ALREADY sorted by
    `fires`, descending; its neuron order then stays as is (checked)."""
    try:
        import kernels.twell as twell
    except ImportError as err:
        raise ConfigError(f"export calibration uses kernels.twell's n_hot rule, which needs triton ({err}); "
                          f"install it (pip install -e '.[kernels]') or export without --calibration-data") from err
    weights = twell.prepare_weights(w_gate.contiguous(), w_up.contiguous(), w_down.contiguous())
    hot = twell.calibrate(weights, fires, tokens)
    if not torch.equal(hot.perm.cpu(), torch.arange(weights.hidden)):
        raise RuntimeError("kernels.twell.calibrate reordered neurons that were already sorted by fire count; "
                           "its ordering rule changed and the export's preset would be wrong")
    return hot.n_hot, weights.tile


def calibrate_and_permute(cfg: ModelConfig, state: dict, data: CalibrationData, device: torch.device,
                          dtype: torch.dtype, log=print) -> tuple[dict, dict]:
    """(state with each relu_gated layer's neurons most-popular-first, the "calibration" record).
    cfg.mlp must be relu_gated (export_checkpoint refuses a swiglu model before it gets here)."""
    import dataclasses

    from megasparse.export.materialize import model_from_state

    model = model_from_state(dataclasses.replace(cfg, mlp_backend="torch"), state, device, dtype).eval()
    log(f"calibrating on {data.tokens} tokens of {data.path} ({data.split} split, sequences of {data.seq_len}) "
        f"on {device}")
    fires = count_fires(model, data, device)
    del model
    tokens = data.tokens
    out = dict(state)
    layers = []
    tile = None
    for i, counts in enumerate(fires):
        order = torch.argsort(counts, descending=True, stable=True)
        prefix = f"layers.{i}.mlp."
        gate = state[prefix + "gate_weight"][order].contiguous()
        up = state[prefix + "up_weight"][order].contiguous()
        down = state[prefix + "down_weight"][:, order].contiguous()
        out[prefix + "gate_weight"], out[prefix + "up_weight"], out[prefix + "down_weight"] = gate, up, down
        sorted_fires = counts[order]
        n_hot, tile = twell_n_hot(gate, up, down, sorted_fires, tokens)
        layers.append({"layer": i, "twell_n_hot": n_hot, "nnz_per_token": round(float(counts.sum()) / tokens, 4),
                       "never_fired": int((counts == 0).sum())})
    record = {"data": data.path, "split": data.split, "tokens": tokens, "seq_len": data.seq_len,
              "device": device.type, "dtype": str(dtype).replace("torch.", ""), "twell_tile": tile,
              "hidden": cfg.ffn_hidden, "layers": layers}
    return out, record
