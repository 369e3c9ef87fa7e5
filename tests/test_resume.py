"""Exact resume: kill -9 a run, resume it, and get the same per-step losses and final weights."""
import json
import os
import sys

import pytest
import torch

from tests.trainer_utils import TINY, _port, check, read_metrics, run, torchrun_cmd, train_cmd

pytestmark = pytest.mark.slow
DRIVER = os.path.join(os.path.dirname(__file__), "resume_driver.py")


def driver_cmd(nproc, run_dir, flag, step, *overrides):
    args = [flag, str(step), *TINY, f"train.run_dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, DRIVER, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_port()), DRIVER, *args]


def launch(nproc, run_dir, *overrides):
    return run(train_cmd(run_dir, *overrides) if nproc == 1 else torchrun_cmd(nproc, run_dir, *overrides))


# What a log line reports: its interval's mean loss terms and sparsity statistics, and the
# state at its step. Comparing them catches a resumed interval that lost or doubled its sums.
LOGGED = ("loss", "ce_loss", "l1_term", "grad_norm", "lr", "l1_coeff", "nnz_per_token", "nnz_max",
          "dead_window_tokens")


def losses_by_step(run_dir, keys=("loss", "grad_norm")):
    # A resumed run appends to the same metrics.jsonl; the last record of a step wins.
    return {r["step"]: tuple(r.get(k) for k in keys) for r in read_metrics(run_dir)}


def final_weights(run_dir, tag="step00000008"):
    path = os.path.join(run_dir, "checkpoints", tag, "mp_rank_00_model_states.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    # ZeRO-3 keeps only partitions: rebuild the fp32 weights from every rank's shard
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(run_dir, "checkpoints"), tag=tag)


# One process logs every step, so every step's loss and grad norm are compared; the others log
# every 3 steps, so the save at step 4 falls inside an interval.
CASES = {
    "zero1": (1, ["parallel.zero_stage=1", "train.log_interval=1"]),
    "zero2_dp2": (2, ["parallel.zero_stage=2", "train.log_interval=3"]),
    "tp2_dp2_zero2": (4, ["parallel.zero_stage=2", "parallel.tp=2", "train.log_interval=3"]),
    "zero3_dp2": (2, ["parallel.zero_stage=3", "train.log_interval=3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_is_bit_exact(tmp_path, case):
    """Where the save at step 4 falls inside a log interval, the line at step 6 must still
    average steps 4-6 (each rank's own sums, restored from its file)."""
    nproc, extra = CASES[case]
    common = ["train.max_steps=8", "train.save_interval=4", "train.global_batch_size=4",
              "train.micro_batch_size=2", *extra]
    check(launch(nproc, tmp_path / "straight", *common))
    killed = run(driver_cmd(nproc, tmp_path / "resumed", "--kill-after-save", 4, *common))
    assert killed.returncode != 0, "the driver should have died by SIGKILL"
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step00000004"
    resumed = launch(nproc, tmp_path / "resumed", *common, "train.resume=auto")
    check(resumed)
    assert "resumed from" in resumed.stdout
    straight, again = (losses_by_step(tmp_path / d, LOGGED) for d in ("straight", "resumed"))
    assert sorted(again) == (list(range(1, 9)) if "train.log_interval=1" in extra else [3, 6, 8])
    assert again == straight  # bit-exact: float equality of everything logged, at every line
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_save_resumes_from_previous_checkpoint(tmp_path):
    """The crash is in a save over an older branch's step 8 (the run went back to step 4 with
    another LR): DeepSpeed would write into that folder in place, under a `latest` that still
    points at it. The old folder must be gone and `latest` back on step 4 before the save."""
    common = ["train.max_steps=8", "train.save_interval=4"]
    ckpt = tmp_path / "r" / "checkpoints"
    check(launch(1, tmp_path / "r", *common))
    assert (ckpt / "latest").read_text() == "step00000008"
    died = run(driver_cmd(1, tmp_path / "r", "--kill-in-save", 8, *common, "optim.lr=1e-3",
                          f"train.resume={ckpt / 'step00000004'}"))
    assert died.returncode != 0
    assert (ckpt / "step00000008").is_dir(), "the interrupted save left its folder behind"
    assert (ckpt / "latest").read_text() == "step00000004"
    meta = json.loads((ckpt / "step00000008" / "megasparse.json").read_text())
    assert meta["config"]["optim"]["lr"] == 1e-3, "only the new branch's files may be in the folder"
    resumed = launch(1, tmp_path / "r", *common, "optim.lr=1e-3", "train.resume=auto")
    check(resumed)
    assert "resumed from" in resumed.stdout and "step00000004" in resumed.stdout
    assert (ckpt / "latest").read_text() == "step00000008"


@pytest.mark.parametrize("stage,tp", [(1, 1), (3, 1), (1, 2)])
def test_resume_at_dp1_from_dp2_checkpoint_sees_same_global_batches(tmp_path, stage, tp):
    """Through a DeepSpeed universal checkpoint. ZeRO-3 caught two loader bugs we work around
    (shared Adam step tensor, group 0's weight decay copied to every group)."""
    common = ["train.max_steps=8", "train.save_interval=4", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.log_interval=3", f"parallel.zero_stage={stage}",
              f"parallel.tp={tp}"]
    check(launch(2 * tp, tmp_path / "dp2", *common))
    run(driver_cmd(2 * tp, tmp_path / "switch", "--kill-after-save", 4, *common))
    check(launch(tp, tmp_path / "switch", *common, "train.resume=auto"))  # dp=1: accumulation 2
    keys = ("loss", "nnz_per_token", "nnz_max", "dead_window_tokens")
    straight, switched = losses_by_step(tmp_path / "dp2", keys), losses_by_step(tmp_path / "switch", keys)
    assert sorted(switched) == [3, 6, 8]
    for step in (3, 6, 8):   # the save at step 4 fell inside the interval of step 6
        assert switched[step] == pytest.approx(straight[step], rel=1e-5), step


def test_keep_last_prunes_old_checkpoints(tmp_path):
    check(launch(1, tmp_path / "r", "train.max_steps=6", "train.save_interval=1", "train.keep_last=2",
                 "train.keep_every=3"))
    tags = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step00000003", "step00000005", "step00000006"]


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    check(launch(1, tmp_path / "r", "train.max_steps=2"))
    proc = launch(1, tmp_path / "r", "train.max_steps=4", "train.resume=auto", "model.d_model=64")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.d_model=32" in proc.stderr
    proc = launch(1, tmp_path / "r", "train.max_steps=4", "train.resume=auto", "train.seed=999")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "train.seed=1234" in proc.stderr


def test_a_changed_lr_on_resume_is_the_configs(tmp_path):
    """LambdaLR restores the checkpoint's base LR; the schedule's factor reads the new config.
    Mixed, a lower optim.lr gave a higher LR (2e-3 x a factor built for 1e-3)."""
    from megasparse.config import load_config
    from megasparse.train.optimizer import lr_multiplier

    check(launch(1, tmp_path / "r", "train.max_steps=2"))
    resumed = launch(1, tmp_path / "r", "train.max_steps=4", "train.resume=auto", "optim.lr=1e-3")
    check(resumed)
    assert "optim.lr 0.002 -> 0.001" in resumed.stdout
    cfg = load_config("configs/demo.yaml", [*TINY, "optim.lr=1e-3", "train.max_steps=4"]).optim
    lrs = {step: lr for step, (lr,) in losses_by_step(tmp_path / "r", ("lr",)).items()}
    for step in (3, 4):
        assert lrs[step] == pytest.approx(1e-3 * lr_multiplier(step, cfg, 4), rel=1e-9), step


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    import signal
    import subprocess
    import time

    from tests.trainer_utils import REPO, env

    run_dir = tmp_path / "r"
    proc = subprocess.Popen(train_cmd(run_dir, "train.max_steps=100000", "train.save_interval=100000"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested by a signal" in out
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 2 <= step < 100000 and read_metrics(run_dir)[-1]["step"] <= step


def test_signal_during_the_stop_vote_is_not_lost(monkeypatch):
    """A signal that lands while the ranks all-reduce their stop flags (where a loaded host spends
    real time) must reach the next vote; it was once overwritten by the vote's result and lost."""
    import signal
    from types import SimpleNamespace

    from megasparse.train import loop

    trainer = SimpleNamespace(stop_signal_received=False, stop_requested=False)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    loop.Trainer._install_signal_handlers(trainer)
    try:
        def all_reduce_hit_by_sigusr1(tensor, op=None):
            signal.raise_signal(signal.SIGUSR1)  # the handler runs before this returns

        monkeypatch.setattr(loop.dist, "all_reduce", all_reduce_hit_by_sigusr1)
        loss = torch.tensor(1.0)
        assert loop.Trainer._finite_everywhere(trainer, loss)
        assert trainer.stop_signal_received and not trainer.stop_requested  # this vote went out before it
        monkeypatch.setattr(loop.dist, "all_reduce", lambda tensor, op=None: None)
        assert loop.Trainer._finite_everywhere(trainer, loss)
        assert trainer.stop_requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_zero3_dp_change_under_tp_is_refused_before_loading(tmp_path):
    """DeepSpeed's ZeRO-3 universal loader cannot merge our TP shards: the plan says so up front."""
    import json
    from types import SimpleNamespace

    from megasparse.config import load_config
    from megasparse.errors import CheckpointError
    from megasparse.train.resume import plan_resume

    cfg = load_config("configs/demo.yaml", [*TINY, "parallel.zero_stage=3", "parallel.tp=2",
                                            "train.resume=auto"])
    tag = tmp_path / "step00000004"
    tag.mkdir()
    (tmp_path / "latest").write_text("step00000004")
    (tag / "megasparse.json").write_text(json.dumps({
        "config": {"model": dict(cfg.model.__dict__)}, "tp": 2, "dp": 2, "zero_stage": 3,
        "tokenizer_hash": "t", "data_hash": "d"}))
    trainer = SimpleNamespace(cfg=cfg, ckpt_dir=str(tmp_path), is_main=True, batch=SimpleNamespace(dp=1),
                              dist=SimpleNamespace(rank=0), data=SimpleNamespace(check_resume=lambda *a: None))
    with pytest.raises(CheckpointError, match="works at tp=1 only.*reset_optimizer_on_resume=true"):
        plan_resume(trainer)
    cfg.train.reset_optimizer_on_resume = True     # weights only: allowed
    assert plan_resume(trainer).universal is False
