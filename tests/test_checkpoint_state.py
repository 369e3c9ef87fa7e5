"""Checkpoint bookkeeping without training: tag folders, and the state a resume restores."""
import torch

from megasparse.train.checkpoint import LATEST, META, clear_tag_for_save, prune_checkpoints, read_latest


def _tag(ckpt, name, complete=True):
    (ckpt / name).mkdir()
    (ckpt / name / "mp_rank_00_model_states.pt").write_text("x")
    if complete:
        (ckpt / name / META).write_text("{}")


def test_saving_over_an_existing_tag_moves_latest_back_then_deletes_it(tmp_path):
    # step 12 is a later step of an abandoned branch: a crash must not make resume=auto go there
    for name, complete in (("step00000004", True), ("step00000006", False), ("step00000008", True),
                           ("step00000012", True)):
        _tag(tmp_path, name, complete)
    (tmp_path / "step00000008_universal").mkdir()
    (tmp_path / LATEST).write_text("step00000008")
    clear_tag_for_save(str(tmp_path), "step00000008")
    assert read_latest(str(tmp_path)) == "step00000004"   # the newest *complete* tag of an earlier step
    assert not (tmp_path / "step00000008").exists() and not (tmp_path / "step00000008_universal").exists()
    clear_tag_for_save(str(tmp_path), "step00000010")      # a new tag: nothing to do
    assert read_latest(str(tmp_path)) == "step00000004"


def test_saving_over_the_only_tag_removes_latest(tmp_path):
    _tag(tmp_path, "step00000004")
    (tmp_path / LATEST).write_text("step00000004")
    clear_tag_for_save(str(tmp_path), "step00000004")
    assert read_latest(str(tmp_path)) is None and not (tmp_path / "step00000004").exists()


def test_saving_over_a_tag_that_latest_does_not_name_keeps_latest(tmp_path):
    _tag(tmp_path, "step00000004")
    _tag(tmp_path, "step00000008")
    (tmp_path / LATEST).write_text("step00000004")
    clear_tag_for_save(str(tmp_path), "step00000008")
    assert read_latest(str(tmp_path)) == "step00000004" and not (tmp_path / "step00000008").exists()


def test_prune_removes_a_step_with_its_universal_copy(tmp_path):
    for step in (1, 2, 3):
        _tag(tmp_path, f"step{step:08d}")
        (tmp_path / f"step{step:08d}_universal").mkdir()
    (tmp_path / LATEST).write_text("step00000003")
    assert prune_checkpoints(str(tmp_path), keep_last=1, keep_every=None) == ["step00000001", "step00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step00000003", "step00000003_universal"]


def test_sparsity_stats_give_the_open_interval_to_one_rank_and_the_window_to_all():
    from megasparse.sparsity.stats import SparsityStats

    stats = SparsityStats(2, 8, 8, torch.device("cpu"))
    stats.update([torch.tensor([1, 0, 2, 0, 0, 0, 0, 3]), torch.ones(8, dtype=torch.int64)],
                 torch.tensor([0.5, 0.25]), tokens=4, token_nnz=[torch.tensor([1, 2, 3, 0]), torch.tensor([2, 2, 2, 2])])
    stats.reduce_and_reset()                   # one closed interval: the window
    stats.update([torch.tensor([0, 1, 0, 0, 0, 0, 0, 0]), torch.zeros(8, dtype=torch.int64)],
                 torch.tensor([0.125, 0.0]), tokens=2, token_nnz=[torch.tensor([1, 0]), torch.tensor([0, 0])])
    state = stats.state_dict()                 # one process: the DP sums are this rank's
    holder, other = (SparsityStats(2, 8, 8, torch.device("cpu")) for _ in range(2))
    assert holder.load_state_dict(state, holds_interval=True) and other.load_state_dict(state, holds_interval=False)
    for s in (holder, other):
        assert torch.equal(s.window_fire, stats.window_fire) and s.window_token_count == 4
        assert s.has_counts and s.has_max
    assert holder.tokens == 2 and torch.equal(holder.fire, stats.fire) and torch.equal(holder.l1, stats.l1)
    assert other.tokens == 0 and int(other.fire.sum()) == 0 and float(other.l1.sum()) == 0.0
    assert holder.reduce_and_reset() == stats.reduce_and_reset()
    assert not SparsityStats(3, 8, 8, torch.device("cpu")).load_state_dict(state)   # another layout


def test_open_interval_totals_round_trip():
    from megasparse.train.interval import StepTotals

    t = StepTotals(torch.device("cpu"), micro_batches=3, skipped=1, steps=2, seconds=1.5)
    t.loss += 6.25
    t.ce += 6.0
    t.aux += 25.0
    back = StepTotals.restored(torch.device("cpu"), t.state())
    assert back.state() == t.state() and back.loss.dtype == t.loss.dtype
    zeroed = StepTotals.restored(torch.device("cpu"), t.state(), holds_sums=False)
    assert (zeroed.loss.item(), zeroed.micro_batches, zeroed.steps, zeroed.skipped, zeroed.seconds) == (0.0, 0, 2, 1, 1.5)
    assert StepTotals.restored(torch.device("cpu"), None).state() == StepTotals(torch.device("cpu")).state()


def test_mlp_backend_choices_round_trip():
    from megasparse.config import ModelConfig
    from megasparse.model.transformer import SparseLlama

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=8)
    a, b = SparseLlama(cfg), SparseLlama(cfg)
    a.layers[1].mlp.measured_nnz_fraction = 0.03
    cal = a.layers[1].mlp.calibration
    cal.choice, cal.nnz_at_choice, cal.step, cal.step_at_choice = "hybrid", 0.04, 300, 200
    b.load_backend_state(a.backend_state())
    assert b.backend_state() == a.backend_state()
    assert b.layers[1].mlp.calibration.choice == "hybrid" and b.layers[0].mlp.measured_nnz_fraction == 1.0
    c = SparseLlama(cfg)      # after a TP change: the choice was timed at another local H
    c.load_backend_state(a.backend_state(), keep_choices=False)
    assert c.layers[1].mlp.measured_nnz_fraction == 0.03 and c.layers[1].mlp.calibration.choice is None
