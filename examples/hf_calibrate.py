"""Warm-starting a converted model: how much of the conversion loss ``hf.calibrate`` recovers.

    sparse-sinkhorn data fetch shakespeare
    python examples/hf_calibrate.py --seeds 3        # about 25 minutes on a 2-core CPU

Per seed: a tiny Llama (the one of ``hf_llama_shakespeare.py``) is trained with dense
attention (``sdpa``) on the Shakespeare plays, then converted to Sinkhorn attention
(random sort nets), and scored in bits/byte on held-out windows as:

* ``dense``: the trained model itself;
* ``converted``: after ``hf.convert`` (random routing, nothing trained);
* ``calibrated``: ``hf.calibrate`` on the converted model (only the sort nets learn, towards
  the model's own dense attention);
* ``fine-tuned``: every weight of the converted model trained on the language-modelling loss,
  the same batches and number of steps as calibration.

``recovered`` = (converted - calibrated) / (converted - dense): the share of the conversion
gap that calibration closes. Needs the ``hf`` and ``train`` extras.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
from hf_llama_shakespeare import _batches, _bytes, _cpu_name, _evaluate, _train
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_sinkhorn import hf
from sparse_sinkhorn.data.load import load_shakespeare

ROWS = ("dense", "converted", "calibrated", "fine-tuned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=250, help="dense training steps")
    ap.add_argument("--adapt-steps", type=int, default=100, help="calibration / fine-tuning")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance", default=hf.OPTIONS["balance"], help="sinkhorn: the paper's")
    ap.add_argument("--pooling", default=hf.OPTIONS["pooling"], help="sum: the paper's")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="examples/hf_calibrate.json")
    args = ap.parse_args()
    if args.length // args.block_size < 8:
        raise SystemExit("--length must hold at least 8 blocks (where routing is sparse)")
    torch.set_num_threads(args.threads)
    train = _bytes(load_shakespeare("train", args.data_dir))
    valid = _bytes(load_shakespeare("valid", args.data_dir))
    start = time.perf_counter()
    runs = [_seed(seed, train, valid, args) for seed in range(args.seeds)]
    table = {
        row: (statistics.mean(r[row] for r in runs), _std([r[row] for r in runs]))
        for row in (*ROWS, "recovered")
    }
    for row in (*ROWS, "recovered"):
        mean, std = table[row]
        print(f"{row:>10}: {mean:.3f} ± {std:.3f}  per seed {[round(r[row], 3) for r in runs]}")
    summary = {
        "settings": vars(args),
        "runs": runs,
        "mean_std": table,
        "wall_s": round(time.perf_counter() - start),
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__},
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {args.out}")


def _seed(seed: int, train: torch.Tensor, valid: torch.Tensor, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.length,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    dense = LlamaForCausalLM(config)
    dense.set_attn_implementation("sdpa")
    _train(dense, train, argparse.Namespace(**{**vars(args), "seed": seed}))
    bpb = {"dense": _bits(dense, valid, args)}
    converted = hf.convert(
        copy.deepcopy(dense), block_size=args.block_size, balance=args.balance, pooling=args.pooling
    )
    bpb["converted"] = _bits(converted, valid, args)

    adapt = argparse.Namespace(**{**vars(args), "steps": args.adapt_steps, "seed": 1000 + seed})
    calibrated = copy.deepcopy(converted)
    hf.calibrate(calibrated, _batches(train, adapt), lr=args.lr)
    bpb["calibrated"] = _bits(calibrated, valid, args)
    tuned = copy.deepcopy(converted)
    _train(tuned, train, adapt)  # the same batches as calibration (same generator seed)
    bpb["fine-tuned"] = _bits(tuned, valid, args)
    gap = bpb["converted"] - bpb["dense"]
    bpb["recovered"] = (bpb["converted"] - bpb["calibrated"]) / gap if gap else float("nan")
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in bpb.items()), flush=True)
    return {"seed": seed, **bpb}


def _bits(model: LlamaForCausalLM, valid: torch.Tensor, args: argparse.Namespace) -> float:
    return _evaluate(model, valid, args) / math.log(2)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    main()
