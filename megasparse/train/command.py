"""`megasparse train CONFIG [key.sub=value ...]`."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML config",
                              description="Train a model. Overrides look like train.max_steps=100.")
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from megasparse.config import load_config
    from megasparse.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0
