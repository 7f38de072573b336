"""`mechcopy train-organism --arch transformer|mamba --out DIR [--steps N] [--seed S]`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mechcopy.commands.common import add_device_args, at_least, positive, prepare_out_dir
from mechcopy.organisms.data import episode_length
from mechcopy.organisms.train import (ARCHS, DEFAULT_MODEL_KWARGS, DEFAULT_STEPS, TrainConfig, check_model_kwargs,
                                      default_dir, train_organism)


def run(args) -> int:
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs is not valid JSON ({e}); write it like '{{\"d_model\": 96}}'") from e
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object such as '{\"d_model\": 96}', "
                         f"got {args.model_kwargs!r}")
    check_model_kwargs(args.arch, {**DEFAULT_MODEL_KWARGS[args.arch], **kwargs},
                       longest=episode_length(TrainConfig.k_max), name="--model-kwargs")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(arch=args.arch, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      model_kwargs=kwargs, device=device, max_minutes=args.max_minutes)
    out = prepare_out_dir(args.out or default_dir(args.arch, args.seed), force=args.force)
    torch.set_num_threads(args.threads)
    _, result = train_organism(cfg, out)
    acc = ", ".join(f"{k} {v:.2f}" for k, v in result.final_accuracy.items())
    if result.stopped_early:
        print(f"{cfg.name}: stopped early: {result.stopped_early}")
    print(f"{cfg.name}: {result.steps_done} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}; "
          f"query accuracy (4 shots): {acc}")
    print(f"saved to {out} (load with mechcopy.organisms.load_organism)")
    return 0


def register(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train-organism", help="train a small transformer or Mamba for in-context learning")
    p.add_argument("--arch", choices=ARCHS, default="transformer")
    p.add_argument("--out", type=Path, help="output folder (default: the cache's organisms/ARCH-sSEED)")
    p.add_argument("--force", action="store_true", help="replace an organism already in --out")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="optimizer steps (default: " + ", ".join(f"{a} {n}" for a, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=at_least(0), default=d.seed)
    p.add_argument("--batch-size", type=at_least(1), default=d.batch_size)
    p.add_argument("--lr", type=positive, default=d.lr)
    p.add_argument("--model-kwargs", help="JSON object overriding the model sizes, e.g. '{\"d_model\": 96}'")
    p.add_argument("--max-minutes", type=positive, default=None,
                   help="wall-time budget: stop and save after this many minutes (the lr schedule ends then)")
    add_device_args(p)
    p.set_defaults(run=run)
