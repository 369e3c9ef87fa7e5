"""Loads a checkpoint's weights into a Trainer (any TP degree) and writes the full logits of a
fixed batch to a file: `python tests/logits_driver.py OUT.pt key=value ...` (torchrun for TP)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megasparse.config import load_config  # noqa: E402
from megasparse.train.loop import Trainer  # noqa: E402


def main() -> None:
    out_path, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config("configs/demo.yaml", overrides))
    batch = torch.stack([trainer.data.valid[i] for i in range(2)])[:, :-1].to(trainer.dist.device)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(batch).logits
    if trainer.is_main:
        torch.save({"logits": logits.cpu(), "step": trainer.step}, out_path)
    trainer.shutdown()


if __name__ == "__main__":
    main()
