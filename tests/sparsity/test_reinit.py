"""Dead-neuron re-initialisation touches only the dead neurons' weights and Adam moments, keeps
the loss finite, and does so under DeepSpeed ZeRO stages 0-3 on 2 gloo ranks."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from megasparse.config import ModelConfig, SparsityConfig
from megasparse.model.sparse_mlp import ReluGatedMLP
from megasparse.model.transformer import SparseLlama
from megasparse.sparsity.reinit import DeadNeuronReinit, _ParamAccess, reinit_dead_neurons
from megasparse.sparsity.stats import SparsityStats
from tests.trainer_utils import _port

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16, mlp_backend="torch")
DEAD = {0: [1, 5, 40], 1: []}  # layer -> neurons declared dead


def _masks():
    masks = [torch.zeros(CFG.ffn_hidden, dtype=torch.bool) for _ in range(CFG.n_layers)]
    for layer, idx in DEAD.items():
        masks[layer][idx] = True
    return masks


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


def _snapshot(model, optimizer):
    """Full fp32 value and moments of every parameter, by name (collective under ZeRO)."""
    out = {}
    for name, p in model.named_parameters():
        acc = _ParamAccess(p, optimizer)
        out[name] = {k: acc.get(k) for k in (None, "exp_avg", "exp_avg_sq")}
    return out


def _expected_changed(name):
    """(dim, indices) of the entries re-initialisation may touch in parameter ``name``."""
    for layer, idx in DEAD.items():
        if name == f"layers.{layer}.mlp.gate_weight" or name == f"layers.{layer}.mlp.up_weight":
            return 0, idx
        if name == f"layers.{layer}.mlp.down_weight":
            return 1, idx
    return None, []


def _check_only_dead_touched(before, after):
    for name, states in before.items():
        dim, idx = _expected_changed(name)
        for key, old in states.items():
            new = after[name][key]
            assert (old is None) == (new is None), name
            if old is None:
                continue
            keep = torch.ones(old.shape[dim] if dim is not None else 1, dtype=torch.bool)
            if idx:
                keep[idx] = False
                assert torch.equal(new.index_select(dim, torch.tensor(idx)) != 0,
                                   torch.ones_like(new.index_select(dim, torch.tensor(idx)), dtype=torch.bool)) \
                    if key is None else bool((new.index_select(dim, torch.tensor(idx)) == 0).all()), (name, key)
                kept = keep.nonzero().flatten()
                assert torch.equal(old.index_select(dim, kept), new.index_select(dim, kept)), (name, key)
            else:
                assert torch.equal(old, new), (name, key)


def _train_steps(model, optimizer, n, backward, step, seed=0):
    for i in range(n):
        inputs, labels = _batch(seed + i)
        out = model(inputs, labels)
        loss = out.ce_loss + 0.01 * out.aux_loss
        backward(loss)
        step()
    return loss


def test_plain_torch_adamw_only_dead_rows_and_finite_loss():
    torch.manual_seed(0)
    model = SparseLlama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_steps(model, opt, 2, lambda loss: loss.backward(), lambda: (opt.step(), opt.zero_grad()))
    before = _snapshot(model, opt)
    counts = reinit_dead_neurons(model, opt, _masks(), init_std=CFG.init_std, seed=7)
    assert counts == [3, 0]
    _check_only_dead_touched(before, _snapshot(model, opt))
    loss = _train_steps(model, opt, 2, lambda loss: loss.backward(), lambda: (opt.step(), opt.zero_grad()))
    assert torch.isfinite(loss)


def test_policy_waits_for_a_full_window_and_the_interval():
    model = SparseLlama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Engine:
        module, optimizer = model, opt

    stats = SparsityStats(CFG.n_layers, CFG.ffn_hidden, CFG.ffn_hidden, torch.device("cpu"), window_tokens=64)
    policy = DeadNeuronReinit(SparsityConfig(reinit_dead=True, reinit_interval=10), CFG.init_std, seed=0)
    fire = [torch.ones(CFG.ffn_hidden, dtype=torch.int32) for _ in range(CFG.n_layers)]
    fire[0][[2, 3]] = 0
    stats.update(fire, torch.zeros(CFG.n_layers), 32)
    stats.reduce_and_reset()
    assert policy(10, stats, Engine) == {}                      # window not full yet (32 < 64 tokens)
    stats.update(fire, torch.zeros(CFG.n_layers), 32)
    stats.reduce_and_reset()
    assert policy(5, stats, Engine) == {}                       # interval not reached
    assert policy(10, stats, Engine)["reinit_neurons_layer"] == [2, 0]
    assert policy(15, stats, Engine) == {}                      # next one only reinit_interval later
    assert policy(20, stats, Engine)["reinit_neurons"] == 2
    assert policy(30, SparsityStats(CFG.n_layers, CFG.ffn_hidden, CFG.ffn_hidden, torch.device("cpu")), Engine) == {}


# ---------------------------------------------------------------- DeepSpeed ZeRO on 2 gloo ranks

class _Toy(torch.nn.Module):
    """Residual stack of the real ReluGatedMLP with a scalar head. (SparseLlama itself does not
    train under ZeRO-3 yet: its LM head weight is used outside the head module's forward, so
    ZeRO-3 never gathers it.)"""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(CFG.n_layers))
        for block in self.layers:
            block.mlp = ReluGatedMLP(CFG.d_model, CFG.ffn_hidden, "torch")
        self.head = torch.nn.Linear(CFG.d_model, 1)
        for p in self.parameters():
            torch.nn.init.normal_(p, 0.0, CFG.init_std * 5)

    def forward(self, x):
        l1 = 0.0
        for block in self.layers:
            y, l1_layer, _, _ = block.mlp(x)
            x, l1 = x + y, l1 + l1_layer
        return (self.head(x) ** 2).mean() + 0.01 * l1


def _toy_steps(engine, n, seed):
    for i in range(n):
        x = torch.randn(2, 8, CFG.d_model, generator=torch.Generator().manual_seed(seed + i))
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    return loss


def _ds_worker(rank, world, port, stages=(0, 1, 2, 3)):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import torch.distributed as dist

    from megasparse.train.distributed import init_distributed

    init_distributed("cpu", "gloo")
    for stage in stages:
        torch.manual_seed(0)
        model = _Toy()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10**9}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        _toy_steps(engine, 2, seed=10 * rank)
        before = _snapshot(engine.module, optimizer)
        counts = reinit_dead_neurons(engine.module, optimizer, _masks(), init_std=CFG.init_std, seed=7)
        assert counts == [3, 0]
        after = _snapshot(engine.module, optimizer)
        _check_only_dead_touched(before, after)
        # The model (low-precision/partitioned) copy matches the fp32 master at the fresh rows.
        gate = engine.module.layers[0].mlp.gate_weight
        with deepspeed.zero.GatheredParameters([gate], enabled=stage == 3):
            assert torch.equal(gate.data.float(), after["layers.0.mlp.gate_weight"][None]), stage
        # Both ranks hold the same full values.
        full = after["layers.0.mlp.gate_weight"][None]
        other = [torch.empty_like(full) for _ in range(world)]
        dist.all_gather(other, full)
        assert torch.equal(other[0], other[1]), stage
        loss = _toy_steps(engine, 2, seed=100 + rank)
        assert torch.isfinite(loss), stage
        # The step after re-init moved the fresh rows (their moments restarted from zero).
        moved = _snapshot(engine.module, optimizer)["layers.0.mlp.gate_weight"][None]
        assert not torch.equal(moved[DEAD[0]], full[DEAD[0]]), stage
        engine.destroy()



@pytest.mark.slow
def test_deepspeed_zero_stages_0_to_3_on_two_ranks():
    mp.spawn(_ds_worker, args=(2, _port()), nprocs=2, join=True)
