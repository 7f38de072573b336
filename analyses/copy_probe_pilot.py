"""Pilot of the label-copy probe (issue 26): which generated tasks show copying, and is their rule learnable?

    python analyses/copy_probe_pilot.py --models smollm2-135m,gemma-3-270m --n 50 \
        --out docs/data/copy_probe_pilot.json

This is probe *design*, not a result of the copy-mechanism study: its numbers choose the probe's tasks
and stay out of docs/copy_mechanism.md's results. It reads only the probe's attribution split (the
default split sizes, so dev and test are never looked at), `n` prompts per task, in three constructions
(`mechcopy.tasks.copy_probe`):

- no-gold: accuracy, copy rate (a wrong answer that is a demo label), the share of answers outside
  the label set, and the demo-share test (`copy_effect.demo_share`: of the wrong answers inside the
  label set, the share that are demo labels, against the share expected if the answer ignored which
  labels the demos show; exact two-sided test);
- standard (gold may be among the demos): accuracy, i.e. is the rule learnable at all;
- copy-control: the copy effect (P(answer = X | X shown) - P(answer = X | X absent), per label, averaged).

Answers are the next-token argmax of the existing evaluator (every probe label is one token on both zoo
tokenizers). The rule that keeps a task (`KEEP_RULE`, `keep`) was fixed before the first run. Each
model's block is written as soon as it is done, into the same file, so models can run one at a time
(`--models` one of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

CONSTRUCTIONS = ("no-gold", "standard", "copy-control")
ALPHA = 0.05
KEEP_RULE = ("keep a task when its no-gold demo share is above chance with p < 0.05 for at least one model and "
             "below chance with p < 0.05 for none, and its standard accuracy is at least twice chance "
             "(2 / labels) for at least one model")


def pilot(model, n: int = 50, shots: int = 4, seed: int = 0, tasks: tuple[str, ...] | None = None,
          batch_size: int = 32) -> dict[str, Any]:
    """Every construction's attribution split of the copy probe (`n` prompts per task) predicted by `model`;
    per task the pilot's figures (see the module docstring) and the predictions."""
    from mechcopy.copy_effect import copy_effect, demo_share
    from mechcopy.evaluation import predict, summarize
    from mechcopy.tasks.copy_probe import DEFAULT_TASKS, PROBE_TASKS, CopyProbeConfig, build_copy_probe

    tasks = tuple(tasks or DEFAULT_TASKS)
    out: dict[str, Any] = {t: {"labels": list(PROBE_TASKS[t].labels)} for t in tasks}
    seconds = {}
    for construction in CONSTRUCTIONS:
        t0 = time.perf_counter()
        probe = build_copy_probe(model.tokenizer, CopyProbeConfig(tasks, construction, shots, n_attr=n), seed)
        preds = predict(model, probe.attribution, batch_size=batch_size)
        seconds[construction] = round(time.perf_counter() - t0, 1)
        for t in tasks:
            rows = [(p, a) for p, a in zip(probe.attribution, preds) if p.task == t]
            prompts, answers = [p for p, _ in rows], [a for _, a in rows]
            labels = PROBE_TASKS[t].labels
            res = summarize(prompts, answers, condition=construction)
            block = {"n": res.n, "accuracy": res.accuracy, "accuracy_ci": list(res.accuracy_ci),
                     "copy_rate": res.copy_rate, "copy_rate_ci": list(res.copy_rate_ci),
                     "outside_labels": sum(a.strip() not in labels for a in answers) / len(answers),
                     "answer_counts": dict(Counter(a.strip() for a in answers).most_common()),
                     "gold_counts": dict(Counter(p.answer for p in prompts).most_common()),
                     "predictions": answers}
            if construction == "no-gold":
                block["demo_share"] = demo_share(prompts, answers, labels, t).to_json()
            if construction == "copy-control":
                block["copy_effect"] = copy_effect(prompts, answers, labels, t, seed=seed).to_json()
            out[t][construction] = block
    return {"seconds": seconds, "tasks": out}


def keep(models: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The tasks `KEEP_RULE` keeps, and why each other one is dropped."""
    tasks = next(iter(models.values()))["tasks"]
    kept, dropped = [], {}
    for t in tasks:
        shares = {m: r["tasks"][t]["no-gold"]["demo_share"] for m, r in models.items()}
        above = [m for m, s in shares.items() if s["p_value"] is not None and s["p_value"] < ALPHA
                 and s["share"] > s["chance"]]
        below = [m for m, s in shares.items() if s["p_value"] is not None and s["p_value"] < ALPHA
                 and s["share"] < s["chance"]]
        chance = 1 / len(tasks[t]["labels"])
        learnt = [m for m, r in models.items() if r["tasks"][t]["standard"]["accuracy"] >= 2 * chance]
        why = []
        if not above:
            why.append("the demo share is not above chance (p < 0.05) for any model")
        if below:
            why.append(f"the demo share is below chance (p < 0.05) for {', '.join(below)}")
        if not learnt:
            why.append(f"standard accuracy is below twice chance ({2 * chance:.2f}) for every model")
        if why:
            dropped[t] = "; ".join(why)
        else:
            kept.append(t)
    return kept, dropped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--n", type=int, default=50, help="prompts per task and construction")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", type=Path, default=Path("docs/data/copy_probe_pilot.json"))
    args = ap.parse_args(argv)
    import torch

    from mechcopy import load_model
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.io import write_atomic
    from mechcopy.provenance import git_revision

    torch.set_num_threads(args.threads)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    settings = {"n": args.n, "shots": args.shots, "seed": args.seed, "split": "attribution",
                "scoring": "next-token argmax"}
    if doc.get("settings", settings) != settings:
        raise SystemExit(f"{args.out} holds a pilot with other settings ({doc['settings']}); use another --out")
    models = doc.get("models", {})
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        model = load_model(name)
        load_s = round(time.perf_counter() - t0, 1)
        res = pilot(model, args.n, args.shots, args.seed)
        models[name] = {"fingerprint": model_fingerprint(model), "git": git_revision(), "load_seconds": load_s,
                        "threads": args.threads, **res}
        kept, dropped = keep(models)
        doc = {"what": "copy-probe pilot (probe design for issue 26, not a result of the study)",
               "command": "python analyses/copy_probe_pilot.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": settings, "keep_rule": KEEP_RULE,
               "kept": kept, "dropped": dropped, "models": models}
        write_atomic(args.out, json.dumps(doc, indent=1))   # one indent: two models' pilots stay under docs/data's 64 KiB
        print(f"{name}: {sum(res['seconds'].values()):.0f} s; kept so far {kept}", file=sys.stderr)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
