"""Each bad input gets one clear line naming what is wrong and the fix, never a deep traceback."""
import pytest

from tests.trainer_utils import check, read_metrics, run, train_cmd

pytestmark = pytest.mark.slow


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def test_config_typo(tmp_path):
    proc = run(train_cmd(tmp_path, "train.max_stepz=3"))
    assert_clean_error(proc, "unknown config key 'train.max_stepz'", "max_steps")


def test_missing_config_file():
    proc = run(["python", "-m", "megasparse.cli", "train", "configs/missing.yaml"])
    assert_clean_error(proc, "configs/missing.yaml", "does not exist")


def test_missing_data_directory(tmp_path):
    proc = run(train_cmd(tmp_path / "r", f"data.path={tmp_path / 'no_such_data'}"))
    assert_clean_error(proc, "no_such_data")


def test_tokenizer_vocab_differs_from_model(tmp_path):
    from megasparse.data import demo_tokenizer

    tok = demo_tokenizer(512)
    proc = run(train_cmd(tmp_path / "r", f"data.tokenizer={tok.path}", "model.vocab_size=1024"))
    assert_clean_error(proc, "vocab size 512", "model.vocab_size=1024")


def _poisoned_trainer(run_dir, on_nonfinite, from_step=2):
    """A real Trainer whose model starts returning a NaN loss at `from_step` (fault injection
    through a forward hook, so the production code path is the one under test)."""
    import dataclasses

    from megasparse.config import load_config
    from megasparse.train.loop import Trainer
    from tests.trainer_utils import TINY

    cfg = load_config("configs/demo.yaml", TINY + [f"train.run_dir={run_dir}", "train.max_steps=5",
                                                  f"train.on_nonfinite={on_nonfinite}",
                                                  "train.micro_batch_size=16"])  # one micro-batch per step
    trainer = Trainer(cfg)

    def poison(module, args, out):
        if trainer.step + 1 >= from_step and module.training:
            return dataclasses.replace(out, ce_loss=out.ce_loss * float("nan"))
        return out

    trainer.engine.module.register_forward_hook(poison)
    return trainer


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    from megasparse.errors import TrainingError

    trainer = _poisoned_trainer(tmp_path / "r", "stop")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 2;.*train.on_nonfinite=skip"):
        trainer.fit()
    assert trainer.step == 1  # the first step completed, the second was refused


def test_nonfinite_loss_skip_keeps_going(tmp_path):
    import math

    import torch

    trainer = _poisoned_trainer(tmp_path / "r", "skip", from_step=3)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.fit()
    rows = read_metrics(tmp_path / "r")
    assert rows[-1]["step"] == 5
    assert [r["skipped_micro_batches"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in rows[:2]) and all(math.isnan(r["loss"]) for r in rows[2:])
    for n, p in trainer.engine.module.named_parameters():
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in trainer.engine.module.named_parameters())
