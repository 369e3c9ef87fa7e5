"""The whole SparseLlama under tensor parallelism equals the tp=1 model built with the same seed:
initial weights (TP-invariant initialisation), logits, CE, the L1 aux term, every gradient, and
the grad norm counted with DeepSpeed's rule (tagged parameters on every TP rank, the rest on TP
rank 0 only). Each worker also builds the tp=1 model locally as the reference."""
import pytest
import torch
import torch.distributed as dist

from tests.parallel.dist_harness import run_distributed

SEED = 1234
TOL = dict(rtol=2e-5, atol=2e-6)


def _cfg(**kw):
    from megasparse.config import ModelConfig

    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                max_seq_len=16, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


def _slice_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from megasparse.parallel.sharding import shard_of

    shard = shard_of(param)
    if shard is None:
        return full
    return full.narrow(shard.dim, shard.start, param.shape[shard.dim])


def _compare(rank, world, model_kw):
    from megasparse.model.transformer import ParallelPlan, SparseLlama
    from megasparse.parallel.plan import TensorParallelPlan
    from megasparse.parallel.setup import kv_replica_groups
    from megasparse.parallel.state import get_parallel_state

    state = get_parallel_state()
    cfg = _cfg(**model_kw)
    ref = SparseLlama(cfg, ParallelPlan(init_seed=SEED))
    tp_model = SparseLlama(cfg, TensorParallelPlan(state, kv_replica_groups(state, cfg.n_kv_heads), init_seed=SEED))
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) == {n for n, _ in tp_model.named_parameters()}
    for name, p in tp_model.named_parameters():
        torch.testing.assert_close(p, _slice_like(ref_params[name].detach(), p), rtol=0, atol=0, msg=name)

    torch.manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    lam = 0.3
    outs = []
    for model in (ref, tp_model):
        out = model(ids[:, :-1], ids[:, 1:])
        (out.ce_loss + lam * out.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].ce_loss, outs[0].ce_loss, **TOL)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss, **TOL)
    if model_kw.get("mlp", "relu_gated") == "relu_gated":
        assert outs[0].aux_loss > 0
        # Per-layer L1 stays per shard (statistics sum it over TP); the shards add up to tp=1.
        summed = outs[1].l1_per_layer.clone()
        dist.all_reduce(summed, group=state.tp_group)
        torch.testing.assert_close(summed, outs[0].l1_per_layer, **TOL)
    for name, p in tp_model.named_parameters():
        torch.testing.assert_close(p.grad, _slice_like(ref_params[name].grad, p), **TOL, msg=name)

    # Grad norm as DeepSpeed counts it (runtime/utils.py is_model_parallel_parameter; ZeRO's
    # get_grad_norm_direct): every element of the full model exactly once.
    local = sum(p.grad.double().pow(2).sum() for p in tp_model.parameters()
                if getattr(p, "tensor_model_parallel", False) or state.tp_rank == 0)
    dist.all_reduce(local, group=state.tp_group)
    full = sum(p.grad.double().pow(2).sum() for p in ref.parameters())
    torch.testing.assert_close(local.sqrt(), full.sqrt(), rtol=1e-5, atol=0)

    with torch.no_grad():
        logits_ref = ref.eval()(ids).logits
        logits_tp = tp_model.eval()(ids).logits
    assert logits_tp.shape == (2, 13, cfg.vocab_size)
    torch.testing.assert_close(logits_tp, logits_ref, **TOL)


def _all(rank, world, variants):
    for kw in variants:
        _compare(rank, world, kw)


@pytest.mark.slow
def test_tp2_model_equals_tp1():
    run_distributed(_all, 2, [dict(), dict(mlp="swiglu", tie_embeddings=True),
                              dict(activation_checkpointing=True)])


@pytest.mark.slow
def test_tp4_model_with_replicated_kv_heads_equals_tp1():
    # n_kv_heads=2 < tp=4: each kv head lives on two ranks; also the untied LM head.
    run_distributed(_all, 4, [dict(tie_embeddings=False)])
