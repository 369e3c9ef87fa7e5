"""The `auto` backend's dense-vs-sparse measurement (model/backend_calibration.py), on CPU with
stand-ins for the CUDA kernels: the policy, the plumbing through the model, and rank agreement."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megasparse.model import sparse_mlp
from megasparse.model.backend_calibration import BackendCalibration, time_forward_backward_ms
from megasparse.model.sparse_mlp import ReluGatedMLP, torch_gated_mlp
from tests.trainer_utils import _port


def test_policy_measures_once_remeasures_after_nnz_halves_and_keeps_sparse():
    cal = BackendCalibration()
    assert cal.backend(0.04) == "torch" and cal.wants_sample()        # pending: dense, keep input
    assert cal.decide(0.04, {"torch": 1.0, "hybrid": 2.0}.get) == "torch"
    assert cal.timings_ms == {"torch": 1.0, "hybrid": 2.0} and not cal.wants_sample()
    assert cal.backend(0.03) == "torch" and not cal.wants_sample()    # not yet half of 0.04
    assert cal.backend(0.02) == "torch" and cal.wants_sample()        # halved: measure again
    assert cal.decide(0.02, {"torch": 1.0, "hybrid": 0.5}.get) == "hybrid"
    assert cal.backend(0.5) == "hybrid"                                # sparse stays sparse
    assert BackendCalibration(enabled=False).backend(0.04) == "hybrid"


def test_policy_measures_a_choice_again_after_recheck_steps():
    cal = BackendCalibration(recheck_steps=200)
    cal.note_step(100)
    assert cal.backend(0.04) == "torch" and cal.wants_sample()
    assert cal.decide(0.04, {"torch": 2.0, "hybrid": 1.0}.get) == "hybrid"
    cal.note_step(299)
    assert cal.backend(0.04) == "hybrid" and not cal.wants_sample()   # 199 steps old: kept
    cal.note_step(300)
    assert cal.backend(0.04) == "torch" and cal.wants_sample()        # due: dense once, keep input
    assert cal.decide(0.04, {"torch": 1.0, "hybrid": 3.0}.get) == "torch"
    cal.note_step(499)
    assert cal.backend(0.04) == "torch" and not cal.wants_sample()
    never = BackendCalibration(recheck_steps=0)
    never.decide(0.04, {"torch": 2.0, "hybrid": 1.0}.get)
    never.note_step(10**6)
    assert never.backend(0.04) == "hybrid"
    with pytest.raises(ValueError, match="recheck_steps"):
        BackendCalibration(recheck_steps=-1)


def test_timing_leaves_parameters_and_rng_untouched():
    mlp = ReluGatedMLP(16, 32)
    for w in mlp.parameters():
        torch.nn.init.normal_(w)
    x = torch.randn(20, 16)
    rng = torch.get_rng_state()
    ms = time_forward_backward_ms(torch_gated_mlp, x, list(mlp.parameters()), warmup=1, iters=3)
    assert ms > 0
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in mlp.parameters())


def _stand_in_hybrid(x, wg, wu, wd):
    return torch_gated_mlp(x, wg, wu, wd)


def _fake_timer(fn, x, weights, warmup, iters):
    """Deterministic timings (wall-clock ones flake on a loaded CI box); the real timer is
    tested above. The stand-in sparse path 'measures' slower."""
    assert fn(x, *weights).y.shape == x.shape
    return 5.0 if fn is _stand_in_hybrid else 1.0


def test_model_plumbing_keeps_dense_when_sparse_measures_slower(monkeypatch):
    """Eligible layer: the next forward stays dense and keeps its input; the next log interval
    (set_measured_nnz) times both paths and keeps the faster; here the stand-in sparse is slower."""
    from megasparse.config import ModelConfig
    from megasparse.model.transformer import SparseLlama

    monkeypatch.setattr(sparse_mlp, "choose_backend", lambda requested, x, frac, thr: "hybrid" if frac < thr else "torch")
    monkeypatch.setattr(sparse_mlp, "_hybrid_forward", _stand_in_hybrid)
    monkeypatch.setattr(sparse_mlp, "time_forward_backward_ms", _fake_timer)
    model = SparseLlama(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                    ffn_hidden=32, max_seq_len=16))
    ids = torch.randint(0, 64, (2, 9))
    assert model.set_measured_nnz([0.5, 0.01]) == {}        # layer 1 eligible, nothing measured yet
    model(ids[:, :-1], ids[:, 1:]).ce_loss.backward()
    mlps = [layer.mlp for layer in model.layers]
    assert [m.last_backend for m in mlps] == ["torch", "torch"]
    assert mlps[0].calibration.sample is None and mlps[1].calibration.sample is not None
    decided = model.set_measured_nnz([0.5, 0.01])
    assert list(decided) == [1] and decided[1][0] == "torch"
    assert decided[1][1] == {"torch": 1.0, "hybrid": 5.0}
    model(ids[:, :-1], ids[:, 1:])
    assert mlps[1].last_backend == "torch" and mlps[1].calibration.sample is None
    # model.sparse_recalibration_steps (default 200) later: the trainer's step makes it due again
    assert mlps[1].calibration.recheck_steps == model.cfg.sparse_recalibration_steps == 200
    assert model.set_measured_nnz([0.5, 0.01], step=150) == {}
    model(ids[:, :-1], ids[:, 1:])
    assert mlps[1].calibration.sample is None                  # 150 steps old: not due
    model.set_measured_nnz([0.5, 0.01], step=200)
    model(ids[:, :-1], ids[:, 1:])
    assert mlps[1].calibration.sample is not None              # due: input kept for measuring
    assert list(model.set_measured_nnz([0.5, 0.01], step=210)) == [1]


def _agree_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cal = BackendCalibration()
        # rank 0 sees sparse a little faster, rank 1 much slower: the summed times decide for both
        local = {"torch": 1.0, "hybrid": 0.9} if rank == 0 else {"torch": 1.0, "hybrid": 3.0}
        assert cal.decide(0.01, local.get) == "torch"
        assert cal.timings_ms == local
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_summed_timings():
    mp.spawn(_agree_worker, args=(2, _port()), nprocs=2, join=True)
