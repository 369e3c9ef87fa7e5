"""Runs the real trainer and kills it for real (SIGKILL) at a chosen point, for resume tests.

  python tests/resume_driver.py --kill-after-save 4 -- key=value ...   # dies right after step 4's save
  python tests/resume_driver.py --kill-in-save 8 -- key=value ...      # dies mid-save at step 8,
                                                                       # after DeepSpeed's files, before `latest`
Works under torchrun too: every rank kills itself at the same point.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasparse.config import load_config  # noqa: E402
from megasparse.train import checkpoint  # noqa: E402
from megasparse.train.loop import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-save", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    trainer = Trainer(load_config("configs/demo.yaml", args.overrides))
    if args.kill_in_save is not None:
        real_fsync = checkpoint.fsync_tree

        def fsync_then_die(path):
            real_fsync(path)
            if path.endswith(checkpoint.tag_for_step(args.kill_in_save)):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.fsync_tree = fsync_then_die
    if args.kill_after_save is not None:
        real_save = trainer.save

        def save_then_die():
            tag = real_save()
            if trainer.step == args.kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return tag

        trainer.save = save_then_die
    trainer.fit()
    trainer.shutdown()


if __name__ == "__main__":
    main()
