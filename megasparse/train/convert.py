"""`megasparse convert SRC DST --tp B`: reshard a checkpoint from tp=A to tp=B.

The shards of every TP rank are pasted into full tensors (using the sharding recorded in the
checkpoint's megasparse.json), then cut for the new degree. The output is a DeepSpeed-loadable
checkpoint folder holding the model, the LR schedule and the training position (step,
consumed samples, L1 schedule). For a ZeRO-1/2 source the Adam moments and fp32 master weights
come too, as a universal checkpoint resharded for tp=B beside it (convert_optimizer.py); the
run resumes from it at any DP degree. Otherwise (ZeRO-0, or `--weights-only`) the moments are
left behind and the run resumes with `train.reset_optimizer_on_resume=true`.
"""
from __future__ import annotations

import json
import os

import torch

from megasparse.errors import CheckpointError
from megasparse.parallel.sharding import shard_range
from megasparse.train.checkpoint import META, read_meta, resolve_resume, tag_for_step, write_latest
from megasparse.train.universal import UNIVERSAL_COMPLETE, UNIVERSAL_SUFFIX, ensure_universal

_DEEPSPEED_KEYS = ("module", "optimizer", "buffer_names", "param_shapes", "frozen_param_shapes",
                   "shared_params", "frozen_param_fragments", "ds_config", "ds_version", "sparse_tensor_module_names")


def model_file(folder: str, tp_rank: int) -> str:
    return os.path.join(folder, f"mp_rank_{tp_rank:02d}_model_states.pt")


def load_shards(folder: str, meta: dict) -> list[dict]:
    """The model-states dicts of every TP rank of a step folder, "module" holding the weights, for
    any ZeRO stage (convert and export)."""
    tp = int(meta.get("tp", 1))
    # a folder written by `megasparse convert` keeps its source's zero_stage but holds plain model files
    zero3 = meta.get("zero_stage") == 3 and not os.path.isfile(model_file(folder, 0))
    return load_zero3_shards(folder, tp) if zero3 else load_model_shards(folder, tp)


def load_zero3_shards(folder: str, tp: int) -> list[dict]:
    """ZeRO-3 keeps every weight only as fp32 partitions in the optimizer shards, and its
    model-states files hold empty placeholders. DeepSpeed's zero_to_fp32 consolidates the
    partitions, but it reads every *_states.pt file of a folder, so each TP rank's files are
    linked into a folder of their own first. The weights are cast to the placeholders' dtype (the
    dtype the model trained in, which the ZeRO-1/2 files hold)."""
    import contextlib
    import glob
    import io
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shards = []
    for rank in range(tp):
        # the optimizer shards of a bf16 run are named bf16_zero_pp_rank_...
        files = sorted(glob.glob(os.path.join(folder, f"*zero_pp_rank_*_mp_rank_{rank:02d}_*_states.pt")))
        head = os.path.join(folder, f"zero_pp_rank_0_mp_rank_{rank:02d}_model_states.pt")
        if head not in files or not any(f.endswith("_optim_states.pt") for f in files):
            raise CheckpointError(f"{folder} was saved with ZeRO-3 at tp={tp}, but TP rank {rank}'s files "
                                  f"(zero_pp_rank_*_mp_rank_{rank:02d}_model_states.pt and *_optim_states.pt) are "
                                  f"missing; the save was incomplete: use another step folder")
        with tempfile.TemporaryDirectory() as tmp:
            os.mkdir(os.path.join(tmp, "rank"))
            for f in files:
                os.symlink(os.path.abspath(f), os.path.join(tmp, "rank", os.path.basename(f)))
            try:
                with contextlib.redirect_stdout(io.StringIO()):   # its progress lines
                    weights = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="rank")
            except Exception as err:   # truncated shards, pickle errors ...: a damaged checkpoint
                raise CheckpointError(f"{folder}: DeepSpeed could not consolidate TP rank {rank}'s ZeRO-3 shards "
                                      f"({type(err).__name__}: {err}); use another step folder") from err
        saved = torch.load(head, map_location="cpu", weights_only=False)
        placeholders = saved.get("module") or {}
        saved["module"] = {name: w.to(placeholders[name].dtype) if name in placeholders else w
                           for name, w in weights.items()}
        shards.append(saved)
    return shards


def load_model_shards(folder: str, tp: int) -> list[dict]:
    """The saved model-states dicts of all tp ranks of a step folder ("module" is the state dict),
    with a clear CheckpointError for a missing, unreadable or foreign file (convert and export)."""
    files = [model_file(folder, r) for r in range(tp)]
    if not any(os.path.isfile(f) for f in files):
        raise CheckpointError(f"{folder} holds no model files (mp_rank_00_model_states.pt ...); the save was "
                              f"incomplete or the files were moved: use another step folder")
    shards = []
    for path in files:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: {folder} was saved at tp={tp} and needs all {tp} model shards")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:   # truncated zip, pickle errors, ...: all mean a damaged file
            raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is "
                                  f"corrupt: use an earlier step folder") from err
        if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
            raise CheckpointError(f"{path} holds no model state dict ('module'); it is not a megasparse/DeepSpeed "
                                  f"model-states file")
        shards.append(saved)
    return shards


def _replicas_for(name: str, tp: int, n_kv_heads: int) -> int:
    """K/V projections are replicated over consecutive TP ranks when tp > n_kv_heads."""
    if name.endswith(("k_proj.weight", "v_proj.weight")) and tp > n_kv_heads:
        return tp // n_kv_heads
    return 1


def merge_shards(shards: list[dict], shard_info: dict) -> dict:
    """Full (tp=1) state dict from the per-TP-rank state dicts."""
    full = {}
    for name, tensor in shards[0].items():
        info = shard_info.get(name)
        if info is None:
            full[name] = tensor
            continue
        step = info["replicas"]
        full[name] = torch.cat([shards[r][name] for r in range(0, len(shards), step)], dim=info["dim"])
        if full[name].shape[info["dim"]] != info["full_size"]:
            raise CheckpointError(f"{name}: merged size {full[name].shape[info['dim']]} != recorded {info['full_size']}")
    return full


def split_full(full: dict, shard_info: dict, tp: int, n_kv_heads: int) -> list[dict]:
    out = [dict() for _ in range(tp)]
    for name, tensor in full.items():
        info = shard_info.get(name)
        for rank in range(tp):
            if info is None or tp == 1:
                out[rank][name] = tensor.clone()
                continue
            start, length = shard_range(info["full_size"], rank, tp, _replicas_for(name, tp, n_kv_heads))
            out[rank][name] = tensor.narrow(info["dim"], start, length).clone()
    return out


def _write_model_files(folder: str, modules: list[dict], client: dict, tp: int, step: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for rank, module in enumerate(modules):
        torch.save({**client, "module": module, "mp_world_size": tp, "dp_world_size": 1, "global_steps": step,
                    "skipped_steps": 0}, model_file(folder, rank))


def convert(src: str, dst: str, tp: int, weights_only: bool = False) -> str:
    from megasparse.config import config_from_dict

    found = resolve_resume(src, src)
    if found is None:
        raise CheckpointError(f"{src}: no checkpoint found")
    load_dir, tag = found
    folder = os.path.join(load_dir, tag)
    meta = read_meta(load_dir, tag)
    cfg_dict = dict(meta["config"])
    cfg_dict["parallel"] = {**cfg_dict["parallel"], "tp": tp}
    config_from_dict(cfg_dict)  # validates tp against heads, kv heads, H and vocab, with clear errors
    shards = load_shards(folder, meta)
    full = merge_shards([s["module"] for s in shards], meta.get("shards", {}))
    out_tag = tag_for_step(meta["step"])
    out_folder = os.path.join(dst, out_tag)
    client = {k: v for k, v in shards[0].items() if k not in _DEEPSPEED_KEYS}
    client["config"] = cfg_dict
    n_kv = meta["config"]["model"]["n_kv_heads"]
    modules = split_full(full, meta.get("shards", {}), tp, n_kv)
    _write_model_files(out_folder, modules, client, tp, meta["step"])
    moments = not weights_only and meta["zero_stage"] in (1, 2) and meta.get("optimizer_states", True) is True
    if moments:
        _convert_moments(load_dir, tag, os.path.join(dst, out_tag + UNIVERSAL_SUFFIX), modules, client, meta, tp)
    new_meta = {**meta, "tp": tp, "dp": None, "config": cfg_dict,
                "optimizer_states": "universal" if moments else False,
                "converted_from": {"path": os.path.abspath(folder), "tp": meta["tp"]}}
    new_meta["shards"] = {n: {**i, "replicas": _replicas_for(n, tp, n_kv)} for n, i in meta.get("shards", {}).items()}
    with open(os.path.join(out_folder, META), "w") as fh:
        json.dump(new_meta, fh, indent=1)
    write_latest(dst, out_tag)
    return out_folder


def _convert_moments(load_dir: str, tag: str, out: str, modules: list[dict], client: dict, meta: dict,
                     tp: int) -> None:
    """The ZeRO-1/2 optimizer state as a universal checkpoint for the new TP degree (see module doc)."""
    from megasparse.train.convert_optimizer import reshard_universal

    try:
        src_universal = os.path.join(load_dir, ensure_universal(load_dir, tag, rank=0))
    except CheckpointError as err:
        raise CheckpointError(f"{err}\nor convert with --weights-only (fresh optimizer moments)") from err
    _write_model_files(out, modules, client, tp, meta["step"])
    reshard_universal(src_universal, out, meta.get("shards", {}), meta["tp"], tp,
                      meta["config"]["model"]["n_kv_heads"])
    open(os.path.join(out, UNIVERSAL_COMPLETE), "w").close()


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="reshard a checkpoint to another tensor-parallel degree")
    p.add_argument("src", help="a checkpoints folder (its `latest`) or one step folder")
    p.add_argument("dst", help="output checkpoints folder")
    p.add_argument("--tp", type=int, required=True, help="the new parallel.tp")
    p.add_argument("--weights-only", action="store_true",
                   help="leave the optimizer moments behind (resume with train.reset_optimizer_on_resume=true)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = convert(args.src, args.dst, args.tp, weights_only=args.weights_only)
    carried = read_meta(os.path.dirname(out), os.path.basename(out))["optimizer_states"] == "universal"
    extra = "" if carried else " train.reset_optimizer_on_resume=true"
    what = "model, LR schedule and Adam moments" if carried else "model and LR schedule (no optimizer moments)"
    print(f"wrote {out}: {what}; resume it with train.resume={args.dst} parallel.tp={args.tp}{extra}")
    return 0
