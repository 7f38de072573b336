"""`mechcopy find --components heads` and `evaluate --prune` of its file on a zoo model, checked by hand.

    python analyses/heads_cli_check.py --model smollm2-135m --heads heads.json --find-log find.log

Reads the head file `find --components heads` wrote (and, where it chose no heads, takes the top 3 of
its copy scores instead, saying so), runs `mechcopy evaluate --prune` of that set on a label task with
no gold among the demos, and compares its pruned predictions with those of the same prompts under a
hook written here that zeroes the heads' `hook_z` (no mechcopy pruning code). Writes
`docs/data/heads_cli_<model>.json`: the find's time and choice, the evaluate rows' rates and the count
of predictions that differ from the hand-made hook's (0 when they agree).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", required=True)
    ap.add_argument("--find-log", default=None, help="the find run's output (for its printed time)")
    ap.add_argument("--task", default="sentiment_binary")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out-dir", default="results/heads")
    ap.add_argument("--data", default="docs/data")
    args = ap.parse_args(argv)

    import torch

    from mechcopy import load_model
    from mechcopy.attribution import CopyScores
    from mechcopy.commands import main as cli
    from mechcopy.components import Components
    from mechcopy.evaluation import predict
    from mechcopy.io import write_json_atomic
    from mechcopy.selection import select
    from mechcopy.suite import build_prompt_sets
    from mechcopy.tasks import load_tasks

    torch.set_num_threads(1)
    heads = Components.load(args.heads)
    found = {"k": len(heads), "heads": [list(p) for p in heads.pairs], "sweep": heads.meta["sweep"],
             "why": heads.meta.get("why") or heads.meta.get("refused"), "times": heads.meta["times"],
             "completeness_error_median": heads.meta["completeness_error_median"]}
    if args.find_log and Path(args.find_log).exists():
        m = re.search(r"in (\d+) s", Path(args.find_log).read_text())
        found["wall_s"] = int(m.group(1)) if m else None
    used = heads
    if not heads.pairs:
        scores = CopyScores.load(heads.meta["scores_path"])
        used = select(scores, "global", k=3)
        found["evaluated_instead"] = "find chose no heads: the top 3 by copy score are evaluated instead"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used_path = used.save(out_dir / f"heads_{args.model}_evaluated.json")
    result = out_dir / f"heads_{args.model}_evaluate.json"
    t0 = time.time()
    flags = ["--tasks", args.task, "--n", str(args.n), "--shots", "4", "--no-gold-in-demos", "--threads", "1"]
    assert cli(["evaluate", "--model", args.model, *flags, "--prune", str(used_path), "--n-random", "1",
                "--out", str(result), "--force"]) == 0
    seconds = round(time.time() - t0, 1)
    rows = {r["condition"]: r for r in json.loads(result.read_text())["results"]}

    model = load_model(args.model)
    prompts = build_prompt_sets(model, load_tasks(args.task), 4, args.n, 0, False)[args.task].prompts

    def zero(heads_of_layer):
        def hook(z, hook):
            z = z.clone()
            z[:, :, heads_of_layer] = 0.0
            return z
        return hook

    by_layer: dict[int, list[int]] = {}
    for layer, head in used.pairs:
        by_layer.setdefault(layer, []).append(head)
    hand = predict(model, prompts, fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero(hs)) for l, hs in by_layer.items()])
    differ = sum(a != b for a, b in zip(rows["pruned"]["predictions"], hand))
    payload = {"model": args.model, "task": args.task, "n": len(prompts), "find": found,
               "evaluated_heads": [list(p) for p in used.pairs], "evaluate_seconds": seconds,
               "rates": {c: {"accuracy": r["accuracy"], "copy_rate": r["copy_rate"]} for c, r in rows.items()},
               "pruned_vs_hand_hook_differ": differ,
               "command": f"python analyses/heads_cli_check.py --model {args.model} --heads {args.heads}"}
    path = write_json_atomic(Path(args.data) / f"heads_cli_{args.model}.json", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "find"}, indent=1), f"\nwrote {path}")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
