"""Cost of calibrated label scoring against plain label scoring, side by side in one run.

    python benchmarks/calibration_cost.py [--model smollm2-135m] [--tasks sentiment_binary,location_continent]
        [--n 40] [--threads 1] [--gold-in-demos] [--out results/calibration_cost.json]

For each task (closed-label tasks, plus `parity`, a task generated here: a number -> "even" / "odd"),
`--n` prompts (no gold among the demos unless `--gold-in-demos`), one thread by default:

- `labels`: plain label scoring (`scoring.score_labels`), the prompt once and each label after it;
- `contextual`: the same prompts and the 3 content-free queries of Zhao et al. ("N/A", "", "[MASK]")
  with each prompt's demos, in one pass: the tokens they share run once, every query and label after;
- `contextual_separate`: the same scores with no shared prefix: plain label scoring of each prompt
  and, separately, of each of its 3 content-free prompts (4 full passes);
- `domain`: the shared-prefix pass with 4 in-domain queries (`scoring.domain_queries`).

Reports seconds per path, the ratios to plain label scoring, the largest difference between the
shared-prefix and separate reference scores (they must agree), and, as a sanity check, accuracy per
readout (greedy generation, label argmax, contextual, domain, batch calibration). Timings on a
shared machine are not comparable: run it alone (`flock /tmp/mechcopy-cpu.lock ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings

import numpy as np
import torch


def parity_task(n: int = 200, seed: int = 0):
    """Numbers 10..999 -> "even" / "odd" (the hand check of DESIGN.md section 3 used such a task)."""
    from mechcopy.tasks import Task

    rng = random.Random(seed)
    numbers = rng.sample(range(10, 1000), n)
    return Task("parity", tuple((str(x), "odd" if x % 2 else "even") for x in numbers), kind="user")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="sentiment_binary,location_continent")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gold-in-demos", action="store_true", help="the standard construction (default: no gold)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from mechcopy import load_model
    from mechcopy.evaluation import predict
    from mechcopy.tasks.outcomes import classify
    from mechcopy.io import write_json_atomic
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.provenance import git_revision
    from mechcopy.scoring import CONTENT_FREE, domain_queries, score_labels, with_query
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.prompts import build_prompts

    tasks = [*load_tasks(args.tasks), parity_task(seed=args.seed)]
    for t in tasks:
        t.require_labels()                                   # refused before the model loads
    model, load_s = timed(lambda: load_model(args.model))
    tok = model.tokenizer
    res = {"model": model_fingerprint(model), "git_revision": git_revision(), "load_s": round(load_s, 1),
           "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
           "n": args.n, "shots": args.shots, "seed": args.seed, "gold_in_demos": args.gold_in_demos,
           "batch_size": args.batch_size, "content_free": list(CONTENT_FREE), "tasks": {}}
    warm = build_prompts(tasks[0], tok, shots=args.shots, n=2, seed=args.seed).prompts
    score_labels(model, warm, tasks[0].require_labels(), references={"contextual": CONTENT_FREE})
    totals = {"labels": 0.0, "contextual": 0.0, "contextual_separate": 0.0, "domain": 0.0}
    for task in tasks:
        labels = task.require_labels()
        prompts = build_prompts(task, tok, shots=args.shots, n=args.n, seed=args.seed,
                                gold_in_demos=args.gold_in_demos).prompts
        domain = domain_queries([x for x, _ in task.pairs], n=4, seed=args.seed)
        bs = args.batch_size
        plain, t_plain = timed(lambda: score_labels(model, prompts, labels, batch_size=bs))
        ctx, t_ctx = timed(lambda: score_labels(model, prompts, labels, references={"contextual": CONTENT_FREE},
                                                batch_size=bs))

        def separate():
            score_labels(model, prompts, labels, batch_size=bs)
            return [score_labels(model, [with_query(p, q, tok) for p in prompts], labels, batch_size=bs).logprobs
                    for q in CONTENT_FREE]

        sep, t_sep = timed(separate)
        dom, t_dom = timed(lambda: score_labels(model, prompts, labels, references={"domain": domain}, batch_size=bs))
        generated = predict(model, prompts, batch_size=bs)
        agree = float(np.abs(np.stack(sep, axis=1) - ctx.reference["contextual"]).max())
        agree = max(agree, float(np.abs(plain.logprobs - ctx.logprobs).max()))
        row = {"labels": list(labels), "n": len(prompts), "domain_queries": list(domain),
               "seconds": {"labels": round(t_plain, 2), "contextual": round(t_ctx, 2),
                           "contextual_separate": round(t_sep, 2), "domain": round(t_dom, 2)},
               "max_abs_diff_shared_vs_separate": agree, "accuracy": {}}
        row["ratio_to_labels"] = {k: round(v / t_plain, 2) for k, v in row["seconds"].items()}
        for name, preds in [("generate", generated), ("labels", plain.predict("labels")),
                            ("contextual", ctx.predict("contextual")), ("domain", dom.predict("domain")),
                            ("batch", plain.predict("batch"))]:
            correct, copy = classify(prompts, preds)
            row["accuracy"][name] = {"accuracy": round(float(correct.mean()), 3), "copy_rate": round(float(copy.mean()), 3)}
        for k in totals:
            totals[k] += row["seconds"][k]
        res["tasks"][task.name] = row
        print(json.dumps({task.name: row}), file=sys.stderr, flush=True)
    res["seconds"] = {k: round(v, 2) for k, v in totals.items()}
    res["ratio_to_labels"] = {k: round(v / totals["labels"], 2) for k, v in totals.items()}
    res["max_abs_diff_shared_vs_separate"] = max(r["max_abs_diff_shared_vs_separate"] for r in res["tasks"].values())
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res, indent=2))
    if args.out:
        write_json_atomic(args.out, res)
    return 0 if res["max_abs_diff_shared_vs_separate"] < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
