"""The exported format: a Hugging Face Llama folder (docs/export.md), both directions.

    OUT/config.json        LlamaConfig fields + a "megasparse" section (our own facts)
    OUT/model.safetensors  HF parameter names, nn.Linear layouts (the same as ours)
    OUT/tokenizer.model    the sentencepiece model the checkpoint was trained with

Our decoder is Llama-shaped (RMSNorm normalising in fp32, rotate-half RoPE, causal GQA with no
biases, MLP = down(act(gate x) * up x)), so only names change: relu_gated is a Llama with
hidden_act "relu", swiglu one with "silu".
"""
from __future__ import annotations

import dataclasses
import re

import torch

from megasparse.config import ModelConfig
from megasparse.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"   # sharded HF folders (read only)
TOKENIZER_FILE = "tokenizer.model"

ACTIVATIONS = {"relu_gated": "relu", "swiglu": "silu"}     # model.mlp -> HF hidden_act
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPE_ALIASES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                  "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}

# (our pattern, HF pattern); {i} is the layer index. Ours are SparseLlama's parameter names.
_LAYER_NAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
]
_MLP_NAMES = {
    "relu_gated": [("mlp.gate_weight", "mlp.gate_proj.weight"), ("mlp.up_weight", "mlp.up_proj.weight"),
                   ("mlp.down_weight", "mlp.down_proj.weight")],
    "swiglu": [(f"mlp.{p}_proj.weight", f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
}
_GLOBAL_NAMES = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                 ("lm_head.weight", "lm_head.weight")]


def parse_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES:
        return value
    if isinstance(value, str) and value.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[value.lower()]
    raise ConfigError(f"dtype={value!r} is not one of bf16, fp32, fp16 (or a torch dtype of those)")


def _name_table(mlp: str) -> tuple[dict, dict]:
    """ours -> HF for global names, and per-layer suffixes ours -> HF."""
    return dict(_GLOBAL_NAMES), dict(_LAYER_NAMES + _MLP_NAMES[mlp])


_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_names(state: dict, mlp: str) -> dict:
    """Our state dict (full, tp=1 names) -> HF Llama names. Unknown names are an error."""
    glob, layer = _name_table(mlp)
    out = {}
    for name, tensor in state.items():
        m = _OURS_LAYER.match(name)
        if m and m.group(2) in layer:
            out[f"model.layers.{m.group(1)}.{layer[m.group(2)]}"] = tensor
        elif name in glob:
            out[glob[name]] = tensor
        else:
            raise CheckpointError(f"parameter {name!r} has no Hugging Face Llama name (model.mlp={mlp}); "
                                  f"this checkpoint holds a parameter the exporter does not know")
    return out


# Buffers older HF Llama checkpoints saved beside the weights; they are recomputed on load.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def from_hf_names(tensors: dict, mlp: str, tie_embeddings: bool, where: str) -> dict:
    """HF Llama names -> ours. With tied embeddings a stored lm_head.weight is dropped, if it
    equals the embeddings (transformers does not tie weights that differ: it would compute
    another model)."""
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if tie_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        raise CheckpointError(f"{where} says tie_word_embeddings=true but stores an lm_head.weight that differs from "
                              f"model.embed_tokens.weight; set tie_word_embeddings=false in config.json to load "
                              f"both (as transformers does), or drop lm_head.weight to tie them")
    glob, layer = _name_table(mlp)
    glob_back = {hf: ours for ours, hf in glob.items()}
    layer_back = {hf: ours for ours, hf in layer.items()}
    out, unknown = {}, []
    for name, tensor in tensors.items():
        m = _HF_LAYER.match(name)
        if _HF_IGNORED.search(name) or (tie_embeddings and name == "lm_head.weight"):
            continue
        if m and m.group(2) in layer_back:
            out[f"layers.{m.group(1)}.{layer_back[m.group(2)]}"] = tensor
        elif name in glob_back:
            out[glob_back[name]] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where} holds tensors a Llama with hidden_act={ACTIVATIONS[mlp]!r} does not have: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; it is not a plain Llama "
                              f"checkpoint that megasparse can load")
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype, special_ids: dict, megasparse: dict) -> dict:
    """config.json: what LlamaForCausalLM needs (transformers 4.x reads rope_theta and
    torch_dtype, 5.x rope_parameters and dtype; both are written) plus our own section."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": ACTIVATIONS[cfg.mlp],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
        "megasparse": megasparse,
    }


def _hf_rope_theta(config: dict, where: str) -> float:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ConfigError(f"{where} uses RoPE scaling ({scaling or rope}); megasparse implements plain RoPE only")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


# ModelConfig fields that the HF Llama fields also state: both must agree (_check_sections)
_HF_STATED = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "mlp",
              "tie_embeddings", "rope_theta", "norm_eps")


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """ModelConfig of an export: its "megasparse" section, else the HF Llama fields (so a plain HF
    Llama with hidden_act relu or silu loads too). With both, they must agree: transformers reads
    only the HF fields, and keeps our section when it re-saves a folder, so an edit on one side
    would make the two loaders compute different functions."""
    section = config.get("megasparse") or {}
    ours = section.get("model")
    if ours is None:
        return _model_config_from_hf_fields(config, where)
    version = section.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(f"{where} has megasparse.format_version={version!r}, newer than this megasparse reads "
                          f"({FORMAT_VERSION}); upgrade megasparse")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise ConfigError(f"{where}: megasparse.model has fields this megasparse does not know: {unknown}; it was "
                          f"written by another version, so upgrade megasparse or re-export the model")
    try:
        cfg = ModelConfig(**ours)
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{where}: the megasparse.model section is invalid ({err}); re-export the model") from err
    _check_sections(cfg, _model_config_from_hf_fields(config, where), where)
    return cfg


def _check_sections(ours: ModelConfig, hf: ModelConfig, where: str) -> None:
    for name in _HF_STATED:
        a, b = getattr(ours, name), getattr(hf, name)
        same = abs(a - b) <= 1e-9 * max(abs(a), abs(b)) if isinstance(a, float) else a == b
        if not same:
            raise ConfigError(f"{where}: its Hugging Face fields give {name}={b!r}, but its megasparse.model section "
                              f"says {a!r}; transformers reads the first and megasparse the second, so they would "
                              f"compute different models. Make them agree (or re-export the model)")


def _model_config_from_hf_fields(config: dict, where: str) -> ModelConfig:
    if config.get("model_type") != "llama":
        raise ConfigError(f"{where} has model_type={config.get('model_type')!r}; megasparse loads Llama "
                          f"checkpoints only (model_type 'llama')")
    act = config.get("hidden_act", "silu")
    mlp = {v: k for k, v in ACTIVATIONS.items()}.get(act)
    if mlp is None:
        raise ConfigError(f"{where} has hidden_act={act!r}; megasparse supports 'relu' (its sparse ReLU-gated "
                          f"MLP) and 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"{where} has {flag}=true; megasparse's Llama has no biases")
    try:
        d_model, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        cfg = ModelConfig(
            vocab_size=int(config["vocab_size"]), d_model=d_model, n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            ffn_hidden=int(config["intermediate_size"]),
            max_seq_len=int(config.get("max_position_embeddings", 2048)), mlp=mlp,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_theta=_hf_rope_theta(config, where), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            init_std=float(config.get("initializer_range", 0.02)))
    except KeyError as err:
        raise ConfigError(f"{where} lacks the Llama field {err}; it is not a complete Llama config.json") from err
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != cfg.head_dim:
        raise ConfigError(f"{where} has head_dim={head_dim} but hidden_size/num_attention_heads={cfg.head_dim}; "
                          f"megasparse derives head_dim from them and cannot load this model")
    return cfg
