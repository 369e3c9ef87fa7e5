"""Typed run configuration: nested dataclasses, a strict YAML loader and `key.sub=value` overrides.

Every field has a default, so a YAML file only names what it changes. Unknown keys are errors
that name the key and the allowed ones (a typo must never be silently ignored). Validation that
needs only the config lives in each dataclass's ``__post_init__``; validation that needs the
world size (data-parallel degree) lives in :func:`resolve_batch`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from megasparse.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None        # grouped-query attention; None means n_heads
    ffn_hidden: int = 704                # H, the MLP hidden width (global, before TP)
    max_seq_len: int = 256
    mlp: str = "relu_gated"              # relu_gated (sparse, L1) | swiglu (dense baseline)
    mlp_backend: str = "auto"            # auto | torch | twell | hybrid (see model/sparse_mlp.py)
    sparse_nnz_threshold: float = 0.05   # auto: use the sparse training kernel below this nnz/H
    sparse_calibration: bool = True      # auto: ... and only if it measured faster for that layer
    sparse_recalibration_steps: int = 200  # auto: measure each layer's choice again after this many steps (0: never)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _check(self.d_model % self.n_heads == 0,
               f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}; "
               f"pick a head count that divides it (e.g. {self.d_model // 64 or 1})")
        _check((self.d_model // self.n_heads) % 2 == 0,
               f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        _choice("model.mlp", self.mlp, ("relu_gated", "swiglu"))
        _choice("model.mlp_backend", self.mlp_backend, ("auto", "torch", "twell", "hybrid"))
        _check(self.sparse_recalibration_steps >= 0,
               f"model.sparse_recalibration_steps={self.sparse_recalibration_steps} must be >= 0 (0: never re-measure)")
        _check(0.0 <= self.sparse_nnz_threshold <= 1.0,
               f"model.sparse_nnz_threshold={self.sparse_nnz_threshold} is a fraction of H in [0, 1]")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SparsityConfig:
    """The L1 lever (docs/sparsity.md). lambda(step): 0 for `delay_steps`, then a ramp from
    `l1_start` to `l1_coeff` over `ramp_steps`, then `l1_coeff`. With a controller, lambda
    follows the measured nnz/token towards a target once the ramp ends."""
    l1_coeff: float = 0.0                # lambda: the final (or constant) L1 coefficient
    schedule: str = "constant"           # constant | linear | cosine | exponential (the ramp shape)
    l1_start: float = 0.0                # lambda0 at the start of the ramp (exponential needs > 0)
    delay_steps: int = 0                 # lambda = 0 before this step (dense warm-up)
    ramp_steps: int = 0                  # ramp length K in steps
    controller: str = "none"             # none | multiplicative | pi: lambda tracks a target nnz
    target_nnz_fraction: float | None = None   # target nnz/token as a fraction of H (e.g. 0.01)
    target_nnz_per_token: float | None = None  # ... or as an absolute count of neurons per token
    controller_start_step: int | None = None   # None: when the ramp ends (delay_steps + ramp_steps)
    controller_gain: float = 0.2         # integral gain on log(measured/target), per update
    controller_kp: float = 1.0           # pi only: proportional gain (damps the approach)
    controller_max_step: float = 0.2     # max |change of log lambda| per update (x1.22)
    controller_smoothing: float = 0.5    # EMA weight of a new measurement (1 = no smoothing)
    controller_deadband: float = 0.1     # |log error| below this (about 10%) leaves lambda alone
    l1_min: float = 1e-6                 # controller bounds on lambda
    l1_max: float = 10.0
    stats_window_tokens: int = 0         # firing/dead-neuron window in tokens; 0: one log interval
    reinit_dead: bool = False            # re-initialise neurons dead for a whole window
    reinit_interval: int = 1000          # steps between re-initialisations
    reinit_until_step: int | None = None  # stop re-initialising after this step (None: never)

    def __post_init__(self) -> None:
        _check(self.l1_coeff >= 0, f"sparsity.l1_coeff={self.l1_coeff} must be >= 0")
        _choice("sparsity.schedule", self.schedule, ("constant", "linear", "cosine", "exponential"))
        _choice("sparsity.controller", self.controller, ("none", "multiplicative", "pi"))
        _check(self.l1_start >= 0, f"sparsity.l1_start={self.l1_start} must be >= 0")
        for name in ("delay_steps", "ramp_steps"):
            _check(getattr(self, name) >= 0, f"sparsity.{name}={getattr(self, name)} must be >= 0")
        if self.schedule == "constant":
            _check(self.ramp_steps == 0,
                   f"sparsity.ramp_steps={self.ramp_steps} has no effect with sparsity.schedule=constant; "
                   f"set sparsity.schedule to linear, cosine or exponential (or ramp_steps to 0)")
        else:
            _check(self.ramp_steps > 0,
                   f"sparsity.schedule={self.schedule} needs sparsity.ramp_steps > 0 (got {self.ramp_steps})")
        if self.schedule == "exponential":
            _check(self.l1_start > 0 and self.l1_coeff > 0,
                   f"sparsity.schedule=exponential ramps geometrically, so sparsity.l1_start={self.l1_start} and "
                   f"sparsity.l1_coeff={self.l1_coeff} must both be > 0; use linear or cosine to start from 0")
        targets = [t for t in (self.target_nnz_fraction, self.target_nnz_per_token) if t is not None]
        if self.controller == "none":
            _check(not targets, "sparsity.target_nnz_fraction / target_nnz_per_token need a controller; "
                                "set sparsity.controller to multiplicative or pi")
        else:
            _check(len(targets) == 1,
                   f"sparsity.controller={self.controller} needs exactly one of sparsity.target_nnz_fraction "
                   f"(fraction of H, e.g. 0.01) or sparsity.target_nnz_per_token (neurons per token)")
        if self.target_nnz_fraction is not None:
            _check(0 < self.target_nnz_fraction < 1,
                   f"sparsity.target_nnz_fraction={self.target_nnz_fraction} must be in (0, 1), e.g. 0.01 for 1% of H")
        if self.target_nnz_per_token is not None:
            _check(self.target_nnz_per_token > 0,
                   f"sparsity.target_nnz_per_token={self.target_nnz_per_token} must be > 0")
        _check(self.controller_start_step is None or self.controller_start_step >= 0,
               f"sparsity.controller_start_step={self.controller_start_step} must be >= 0 (or omitted)")
        for name in ("controller_gain", "controller_kp", "controller_deadband"):
            _check(getattr(self, name) >= 0, f"sparsity.{name}={getattr(self, name)} must be >= 0")
        _check(self.controller_max_step > 0, f"sparsity.controller_max_step={self.controller_max_step} must be > 0")
        _check(0 < self.controller_smoothing <= 1,
               f"sparsity.controller_smoothing={self.controller_smoothing} must be in (0, 1] (1: no smoothing)")
        _check(0 < self.l1_min <= self.l1_max,
               f"sparsity.l1_min={self.l1_min} and l1_max={self.l1_max} need 0 < l1_min <= l1_max")
        _check(self.stats_window_tokens >= 0,
               f"sparsity.stats_window_tokens={self.stats_window_tokens} must be >= 0 (0: one log interval)")
        _check(self.reinit_interval > 0, f"sparsity.reinit_interval={self.reinit_interval} must be positive")
        _check(self.reinit_until_step is None or self.reinit_until_step >= 0,
               f"sparsity.reinit_until_step={self.reinit_until_step} must be >= 0 (or omitted)")

    @property
    def ramp_end(self) -> int:
        return self.delay_steps + self.ramp_steps


@dataclass
class ParallelConfig:
    tp: int = 1                          # tensor-parallel degree; DP = world_size / tp
    zero_stage: int = 1                  # DeepSpeed ZeRO stage 0..3
    backend: str = "auto"                # auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def __post_init__(self) -> None:
        _check(self.tp >= 1, f"parallel.tp={self.tp} must be >= 1")
        _choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_steps: int | None = None    # cosine decay length; None means train.max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0               # 0 disables clipping
    decay_norms: bool = False            # apply weight decay to norm gains
    decay_embeddings: bool = False       # apply weight decay to embeddings and the LM head
    implementation: str = "auto"         # AdamW kernels: auto (fused on CUDA, foreach on CPU) | fused | foreach | for-loop

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be positive")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _choice("optim.implementation", self.implementation, ("auto", "fused", "foreach", "for-loop"))


@dataclass
class DataConfig:
    path: str | None = None              # a `megasparse data preprocess` directory; None: bundled demo text
    tokenizer: str | None = None         # sentencepiece .model; None: the cached demo tokenizer
    seq_len: int = 256
    valid_fraction: float = 0.05         # bundled text only: held-out share, split by document
    num_workers: int = 0
    verify_shards: bool = False          # hash every shard against metadata.json at start (reads all data)

    def __post_init__(self) -> None:
        _check(self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive")
        _check(0 < self.valid_fraction < 1, f"data.valid_fraction={self.valid_fraction} must be in (0, 1)")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")


@dataclass
class TrainConfig:
    run_dir: str | None = None           # default: runs/<config file stem>
    max_steps: int = 200
    micro_batch_size: int = 8            # sequences per DP rank per forward
    global_batch_size: int = 8           # sequences per optimizer step over all DP ranks
    grad_accum_steps: int | None = None  # None: derived from the two above and DP
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    save_interval: int = 100
    seed: int = 1234
    dtype: str = "auto"                  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"                 # auto | cpu | cuda
    on_nonfinite: str = "stop"           # stop | skip: what a NaN/inf loss does
    progress_bar: bool = True            # only when stdout is a terminal
    resume: str | None = None            # "auto" (latest in run_dir, if any) | a checkpoint path | None
    reset_optimizer_on_resume: bool = False  # load weights only: fresh optimizer and LR schedule state
    keep_last: int = 3                   # checkpoints kept (0 keeps all)
    keep_every: int | None = None        # also keep every step that is a multiple of this, for good
    profile_steps: list | None = None    # [first, last]: profile these steps (train/profiling.py)
    # bf16 with ZeRO-1/2: DeepSpeed scans every gradient for inf/NaN before each optimizer step
    # and skips the step if it finds any (ZeRO-3 never scans bf16 gradients). False saves that
    # scan's host time; a non-finite gradient then reaches the weights, and the run stops at the
    # next non-finite loss (train.on_nonfinite=stop).
    check_grad_overflow: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval",
                     "eval_interval", "eval_iters", "save_interval"):
            _check(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        _check(self.grad_accum_steps is None or self.grad_accum_steps > 0,
               f"train.grad_accum_steps={self.grad_accum_steps} must be positive (or omitted to derive it)")
        _choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _check(self.keep_last >= 0, f"train.keep_last={self.keep_last} must be >= 0 (0 keeps every checkpoint)")
        _check(self.keep_every is None or self.keep_every > 0, f"train.keep_every={self.keep_every} must be positive")
        _check(self.check_grad_overflow or self.on_nonfinite == "stop",
               "train.check_grad_overflow=false needs train.on_nonfinite=stop: without the scan a non-finite "
               "gradient reaches the weights, and skipping every later micro-batch would hide it")
        p = self.profile_steps
        _check(p is None or (isinstance(p, list) and len(p) == 2 and all(type(s) is int and s > 0 for s in p)
                             and p[0] <= p[1]),
               f"train.profile_steps={p!r} must be [first, last], two step numbers with 0 < first <= last "
               f"(e.g. train.profile_steps=[20,22])")
        _check(p is None or p[1] <= self.max_steps,
               f"train.profile_steps={p!r} ends after train.max_steps={self.max_steps}; pick steps up to "
               f"{self.max_steps}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"                    # the config file stem unless set

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        _check(d.seq_len <= m.max_seq_len,
               f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
        _check(m.n_heads % self.parallel.tp == 0,
               f"parallel.tp={self.parallel.tp} must divide model.n_heads={m.n_heads}")
        _check(m.n_kv_heads % self.parallel.tp == 0 or self.parallel.tp % m.n_kv_heads == 0,
               f"parallel.tp={self.parallel.tp} and model.n_kv_heads={m.n_kv_heads}: one must divide the other")
        _check(m.ffn_hidden % self.parallel.tp == 0,
               f"parallel.tp={self.parallel.tp} must divide model.ffn_hidden={m.ffn_hidden}")
        _check(m.vocab_size % self.parallel.tp == 0,
               f"parallel.tp={self.parallel.tp} must divide model.vocab_size={m.vocab_size}; pad the vocab to a multiple")
        if self.train.run_dir is None:
            self.train.run_dir = os.path.join("runs", self.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic, resolved once the data-parallel degree is known."""
    dp: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int


def resolve_batch(cfg: Config, world_size: int) -> BatchPlan:
    """micro × accumulation × DP must equal the global batch; derive accumulation when omitted."""
    tp = cfg.parallel.tp
    _check(world_size % tp == 0,
           f"world size {world_size} is not divisible by parallel.tp={tp}; launch a multiple of {tp} processes")
    dp = world_size // tp
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.grad_accum_steps is None:
        _check(t.global_batch_size % per_step == 0,
               f"train.global_batch_size={t.global_batch_size} is not divisible by "
               f"train.micro_batch_size={t.micro_batch_size} x DP={dp} = {per_step}; "
               f"use a global batch that is a multiple of {per_step}")
        accum = t.global_batch_size // per_step
    else:
        accum = t.grad_accum_steps
        _check(per_step * accum == t.global_batch_size,
               f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum_steps={accum} x DP={dp} = "
               f"{per_step * accum} != train.global_batch_size={t.global_batch_size}; "
               f"fix one of them or omit train.grad_accum_steps to derive it")
    return BatchPlan(dp=dp, micro_batch_size=t.micro_batch_size, grad_accum_steps=accum,
                     global_batch_size=t.global_batch_size)


# ---------------------------------------------------------------- loading and overrides

def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a field's type annotation; int->float is allowed."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is not None and type(None) in args:  # Optional[X] / X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-4" as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        _check(ok, f"{where}={value!r} should be of type {annotation.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; allowed keys{' under ' + where if where else ''}: "
                              f"{', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - defensive; fields are all defaulted
        raise ConfigError(f"{where}: {err}") from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """`a.b=value` strings to a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    return _build(Config, data, "")


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when path is None) and apply `key.sub=value` overrides."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/demo.yaml")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
        data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically (write then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
