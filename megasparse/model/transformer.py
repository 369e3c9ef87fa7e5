"""A Llama-shaped decoder whose FFN is the ReLU-gated sparse MLP (or a dense SwiGLU baseline).

The forward returns the CE loss and the sparsity side outputs (the per-layer L1 terms and fire
counts) rather than logits, so the loss can be computed without materialising full-vocabulary
logits under tensor parallelism, and so the trainer gets its statistics with no extra pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.cross_entropy import cross_entropy as fused_cross_entropy
from megasparse.config import ModelConfig
from megasparse.model.attention import Attention, RMSNorm, rotary_tables
from megasparse.model.sparse_mlp import ReluGatedMLP, SwiGLUMLP
from megasparse.parallel.initialization import seeded_normal_


@dataclass
class ModelOutput:
    ce_loss: torch.Tensor | None         # 0-dim fp32, mean over tokens (None without labels)
    aux_loss: torch.Tensor               # 0-dim fp32, mean over layers of the layers' full-H L1 terms
    l1_per_layer: torch.Tensor           # [n_layers] fp32, detached; this TP rank's shard (statistics
                                         # sum it over TP ranks, see sparsity/stats.py)
    fire_counts: list                    # per layer: [H_local] int32 (tokens with g_j > 0) or None
    tokens: int                          # tokens in this micro-batch
    logits: torch.Tensor | None = None   # only when no labels were given
    token_nnz: list | None = None        # per layer: [M] int32 active local neurons per token, or None


def plain_linear(in_features: int, out_features: int, kind: str, **sharding) -> nn.Linear:
    """Default projection factory (no tensor parallelism): a bias-free nn.Linear. `kind`
    ("column"/"row") and the sharding options (input_in_region, replicas) only matter under
    tensor parallelism. Sizes are always the model's full sizes."""
    return nn.Linear(in_features, out_features, bias=False)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ParallelPlan:
    """How layers are built, sharded, initialised and joined. The default is a single rank;
    tensor parallelism provides a subclass with parallel layers and mappings
    (megasparse/parallel/plan.py).

    ``init_seed`` fixes the initialisation; None draws it from torch's global generator, so
    ``torch.manual_seed`` governs a model built without a plan. Initialisation is per parameter
    from (seed, name), hence the same full weights at any TP degree."""

    tp_size = 1
    linear = staticmethod(plain_linear)

    def __init__(self, init_seed: int | None = None):
        self.init_seed = init_seed

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab, dim)

    def enter_region(self, x: torch.Tensor) -> torch.Tensor:
        """Before the column-parallel projections of one input (identity without TP)."""
        return x

    def mlp_regions(self):
        """(enter, leave) mappings around the sparse MLP's local computation."""
        return _identity, _identity

    def shard_sparse_mlp(self, mlp: nn.Module) -> None:
        """Tag the sparse MLP's own weights with their sharding (nothing to do without TP)."""

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over TP ranks of per-shard partial sums (the L1 terms)."""
        return t

    def lm_head(self, dim: int, vocab: int) -> nn.Module:
        return nn.Linear(dim, vocab, bias=False)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.is_cuda:
            # Two Triton passes over the bf16 logits instead of torch's fp32 cast, fp32 log-softmax
            # and dense fp32 gradient: 8.9 -> 1.1 ms and 6 -> 1 GB extra at 16k x 32k on an H100
            # (bench/results/cross_entropy_h100.md). The logits are this loss's alone (forward
            # returns them only without labels), so the backward writes its gradient over them.
            return fused_cross_entropy(logits, labels, inplace_backward=True)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    def lm_logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        return hidden @ head_weight.t()

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary from what lm_logits returned (for generation)."""
        return logits

    def initialization_seed(self) -> int:
        if self.init_seed is not None:
            return int(self.init_seed)
        return int(torch.randint(0, 2**62, (1,)).item())


class LMOutput(nn.Module):
    """The LM head's projection and the loss, in a module of their own (it has no parameters).

    The head weight belongs to the embedding (tied) or to ``lm_head``, but is used here. ZeRO-3
    gathers a partitioned weight only inside the forward and backward of a module that owns it
    or registered it (``register_external_parameter``, done by ``ParallelSetup.build_model``),
    and hooks the backward through tensor outputs, which this module returns."""

    def __init__(self, plan: "ParallelPlan"):
        super().__init__()
        self.plan = plan

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The mean CE with labels; the full-vocabulary logits without."""
        logits = self.plan.lm_logits(hidden, head_weight)
        if labels is None:
            return self.plan.full_logits(logits)
        return self.plan.cross_entropy(logits, labels)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ParallelPlan):
        super().__init__()
        tp = plan.tp_size
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Full head counts go in; Attention keeps n_heads/tp query heads and max(n_kv/tp, 1) kv
        # heads (kv heads are replicated when tp > n_kv_heads).
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, plan.linear,
                              tp_size=tp, enter_region=plan.enter_region)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.mlp == "relu_gated":
            enter, leave = plan.mlp_regions()
            # The sparse MLP owns its weights, so it is given its local width and tagged after.
            self.mlp = ReluGatedMLP(cfg.d_model, cfg.ffn_hidden // tp, cfg.mlp_backend,
                                    cfg.sparse_nnz_threshold, enter, leave, calibrate=cfg.sparse_calibration,
                                    recalibrate_steps=cfg.sparse_recalibration_steps)
            plan.shard_sparse_mlp(self.mlp)
        else:
            # SwiGLU builds its projections through the factory, which takes full sizes.
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.ffn_hidden, plan.linear, enter_region=plan.enter_region)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, l1, fire_counts, token_nnz = self.mlp(self.mlp_norm(x))
        return x + y, l1, fire_counts, token_nnz


class SparseLlama(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ParallelPlan | None = None):
        super().__init__()
        self.cfg = cfg
        self.plan = plan or ParallelPlan()
        self.embed = self.plan.embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderBlock(cfg, self.plan) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else self.plan.lm_head(cfg.d_model, cfg.vocab_size)
        self.output = LMOutput(self.plan)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); output projections of each residual branch scaled by
        1/sqrt(2 n_layers) (GPT-2), so the residual stream's variance does not grow with depth.

        Each weight is drawn in full from its own generator, seeded by (plan seed, name), and a
        sharded weight keeps its slice: the same seed gives the same full model at any TP degree."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        seed = self.plan.initialization_seed()
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_weight", "down_proj.weight")):
                seeded_normal_(p, name, out_std, seed)
            else:
                seeded_normal_(p, name, std, seed)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final normed hidden states [B, T, D], without the LM head: what a prefill
        computes (the whole-model benchmark times this, as the paper does)."""
        x, _, _, _ = self._decode(input_ids)
        return self.norm(x)

    def _decode(self, input_ids: torch.Tensor):
        """Embedding and layers: (x, per-layer L1 terms, fire counts, per-token nnz)."""
        seq = input_ids.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        l1_terms, fire_counts, token_nnz = [], [], []
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, l1, counts, per_token = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, l1, counts, per_token = layer(x, cos, sin)
            l1_terms.append(l1)
            fire_counts.append(counts)
            token_nnz.append(per_token)
        return x, l1_terms, fire_counts, token_nnz

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        x, l1_terms, fire_counts, token_nnz = self._decode(input_ids)
        l1_local = torch.stack(l1_terms)
        # One all-reduce of [n_layers] per micro-batch makes the loss the full-H value, the same
        # at any TP degree; its backward is the identity, so each shard's L1 gradient stays local.
        l1_full = self.plan.sum_over_shards(l1_local)
        result = self.output(self.norm(x), self.head_weight(), labels)
        return ModelOutput(ce_loss=None if labels is None else result, aux_loss=l1_full.mean(),
                           l1_per_layer=l1_local.detach(), fire_counts=fire_counts, token_nnz=token_nnz,
                           tokens=input_ids.numel(),
                           logits=result if labels is None else None)

    def weights_updated(self) -> None:
        """Every sparse MLP rebuilds its twell inference layout on its next forward. Needed after
        any weight write that does not move the parameters' version counters: DeepSpeed's ZeRO
        optimizer steps do not (twell_layout.py), so Trainer.evaluate calls this first."""
        for layer in self.layers:
            if isinstance(layer.mlp, ReluGatedMLP):
                layer.mlp.weights_updated()

    def set_measured_nnz(self, fractions: list[float], step: int | None = None) -> dict:
        """Per-layer measured nnz/H, which the `auto` backend compares with its threshold; layers
        that became eligible since the last call are timed dense vs sparse now (all ranks call
        this at the same log interval). `step`, the trainer's step, makes choices older than
        model.sparse_recalibration_steps due again. Returns {layer index: (choice, {backend: ms})}
        for the layers measured now."""
        decided = {}
        for i, (layer, frac) in enumerate(zip(self.layers, fractions)):
            if isinstance(layer.mlp, ReluGatedMLP):
                layer.mlp.measured_nnz_fraction = float(frac)
                if step is not None:
                    layer.mlp.calibration.note_step(step)
                choice = layer.mlp.calibrate_pending()
                if choice is not None:
                    decided[i] = (choice, layer.mlp.calibration.timings_ms)
        return decided

    def backend_state(self) -> list:
        """Per layer, what the `auto` MLP dispatch has learned (the measured nnz/H and the timed
        dense/sparse choice), so a resumed run runs the same kernels as the uninterrupted one."""
        return [{"measured_nnz_fraction": layer.mlp.measured_nnz_fraction,
                 "calibration": layer.mlp.calibration.state_dict()} if isinstance(layer.mlp, ReluGatedMLP) else None
                for layer in self.layers]

    def load_backend_state(self, state: list, keep_choices: bool = True) -> None:
        """backend_state() back. keep_choices=False restores only the measured nnz/H, so each
        layer times its choice again (it depends on the local H: after a TP change)."""
        if len(state) != len(self.layers):
            raise ValueError(f"MLP backend state for {len(state)} layers, but the model has {len(self.layers)}")
        for layer, s in zip(self.layers, state):
            if s is not None and isinstance(layer.mlp, ReluGatedMLP):
                layer.mlp.measured_nnz_fraction = s["measured_nnz_fraction"]
                if keep_choices:
                    layer.mlp.calibration.load_state_dict(s["calibration"])

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
