"""`megasparse export CHECKPOINT OUT_DIR`: a training checkpoint as a Hugging Face Llama folder."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint as a Hugging Face Llama folder (safetensors), optionally calibrated",
        description="Merge a checkpoint's TP shards and write OUT_DIR/config.json, model.safetensors and "
                    "tokenizer.model, loadable by transformers' LlamaForCausalLM and by "
                    "megasparse.inference.load_pretrained. With --calibration-data, each sparse layer's neurons "
                    "are sorted most-popular-first and the TwELL n_hot is recorded (docs/export.md).")
    p.add_argument("checkpoint", help="a step folder, a checkpoints folder (its `latest`) or a run directory")
    p.add_argument("out_dir", help="output folder (created; must be new or empty unless --overwrite)")
    p.add_argument("--calibration-data", metavar="DIR",
                   help="a `megasparse data preprocess` folder (its valid split, else train) to count neuron fires on")
    p.add_argument("--calibration-tokens", type=int, default=8192, metavar="N",
                   help="tokens to calibrate on (default 8192)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="sentencepiece .model to ship (default: the one the checkpoint was trained with)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (calibration only; default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="weight dtype of the export (default auto: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megasparse.export.writer import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out_dir, calibration_data=args.calibration_data,
                               calibration_tokens=args.calibration_tokens, tokenizer=args.tokenizer,
                               device=args.device, dtype=args.dtype, overwrite=args.overwrite)
    cal = result.calibration
    if cal is not None:
        print(f"neurons sorted most-popular-first over {cal['tokens']} tokens; twell tile {cal['twell_tile']}")
        for layer in cal["layers"]:
            print(f"  layer {layer['layer']:3d}: nnz/tok {layer['nnz_per_token']:9.2f}  twell n_hot "
                  f"{layer['twell_n_hot']:5d}  never fired {layer['never_fired']}/{cal['hidden']}")
    print(f"load it with transformers.LlamaForCausalLM.from_pretrained({result.out_dir!r}) or "
          f"megasparse.inference.load_pretrained({result.out_dir!r})")
    return 0
