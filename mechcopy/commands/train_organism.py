"""`mechcopy train-organism --arch transformer|mamba --out DIR [--steps N] [--seed S]`."""

from __future__ import annotations

import json


def run(args) -> int:
    import torch

    from mechcopy.organisms.train import TrainConfig, default_dir, train_organism

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"d_model\": 96}}', got {args.model_kwargs!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(arch=args.arch, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      model_kwargs=kwargs, device=device, max_minutes=args.max_minutes)
    out = args.out or default_dir(args.arch, args.seed)
    _, result = train_organism(cfg, out)
    acc = ", ".join(f"{k} {v:.2f}" for k, v in result.final_accuracy.items())
    if result.stopped_early:
        print(f"{cfg.name}: stopped early: {result.stopped_early}")
    print(f"{cfg.name}: {result.steps_done} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}; "
          f"query accuracy (k=4): {acc}")
    print(f"saved to {out} (load with mechcopy.organisms.load_organism)")
    return 0


def register(sub) -> None:
    from mechcopy.organisms.train import ARCHS, DEFAULT_STEPS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train-organism", help="train a small transformer or Mamba for in-context learning")
    p.add_argument("--arch", choices=ARCHS, default="transformer")
    p.add_argument("--out", help="output folder (default: the cache's organisms/ARCH-sSEED)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: " + ", ".join(f"{a} {n}" for a, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--model-kwargs", help="JSON object overriding the model sizes, e.g. '{\"d_model\": 96}'")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget: stop and save after this many minutes (the lr schedule ends then)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(run=run)
