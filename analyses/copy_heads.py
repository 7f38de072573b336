"""The copy-mechanism study's top heads: label attention, the OV check and activation patching
(docs/copy_mechanism.md, "Second session ...", last paragraph; descriptive, no criterion).

    python analyses/copy_heads.py --model smollm2-135m --work results/copy_mechanism/smollm2-135m

* **The top heads**: the mean over the selection seeds of the head attribution's scores (IG over heads
  from the label-swap counterfactual, `method.score`), as the study's `heads-last` arm saved them
  (`<work>/heads-last_select_seed<S>.json`; the same attribution as the `heads` arm). Those files keep
  each seed's top 20 scores only (`scores_top`), so `top_heads` takes the top k among the heads scored
  on every seed and refuses unless no other head could reach them (its missing scores at most that
  seed's 20th).
* **Label attention and the OV check** (`label_attention.label_attention`) of every head, on the copy
  probe's test split (copy-control, the probe tasks of `copy_mechanism.probe_tasks`) and on the held-out
  tasks' no-gold prompts (`suite.build_prompt_sets`, as `suite.run_evaluation` builds them for the
  study: n, shots and prompt seed of the study's SETTINGS): each head's mean over all prompts of the
  final position's attention to the demo-label tokens and of the OV margin of its most attended label,
  and each top head's percentile among all other heads (`percentile`).
* **Activation patching** of the top heads on the probe's test split (no-gold; each prompt paired with
  its label-swap counterfactual exactly as the study's attribution pairs them, `head_attributions`):
  the counterfactual's `z` of one head patched into the clean run (`head_patching`'s batched runner,
  from the head's layer on), at the last position (the attribution's site) and at every position; read
  as the change of
  T = logit(X) - logit(gold) at the last position. Its ranking of the top heads (by -dT: a head that
  carries X lowers T when it gets the counterfactual's output) is compared with the attribution's
  (Spearman): self-consistency on prompts the attribution never saw.

Each stage's result goes to `--out-dir` (ignored `results/copy_heads/<model>/`) and is reused when
there (`provenance.run_stages`); the summary goes to `docs/data/copy_mechanism_heads_<model>.json`
and the figure to `docs/figures/copy_mechanism_heads_<model>.png`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
Head = tuple[int, int]


def study_module():
    """analyses/copy_mechanism.py (the study's driver), imported from beside this file."""
    path = Path(__file__).with_name("copy_mechanism.py")
    spec = importlib.util.spec_from_file_location("copy_mechanism", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the study's driver from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def name(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


# ---------------------------------------------------------------- the top heads of the attribution


def top_heads(selections: Sequence[dict], k: int = 8, n_heads: int | None = None,
              ) -> tuple[list[Head], dict[Head, float], dict[str, Any]]:
    """The top `k` heads by the mean over seeds of the attribution scores each selection saved
    (`scores_top`: [layer, head, score] rows, that seed's top scores only, or every eligible head's).

    Only heads scored on every seed have a mean; a head missing on a seed scored at most that seed's
    lowest stored score there, so its mean is at most its bound, and so is that of a head in no row
    unless the rows name all `n_heads` heads. Refused unless the k-th mean is above every such bound
    (then no head outside the stored rows could be in the top k). Returns (the top k, every complete
    mean, the check)."""
    per: dict[Head, dict[int, float]] = {}
    floors = []
    for i, sel in enumerate(selections):
        rows = sel.get("scores_top")
        if not rows:
            raise ValueError(f"selection of seed {sel.get('seed', i)} has no scores_top: not a head selection")
        floors.append(min(r[2] for r in rows))
        for layer, head, score in rows:
            per.setdefault((int(layer), int(head)), {})[i] = float(score)
    n = len(selections)
    means = {h: sum(v.values()) / n for h, v in per.items() if len(v) == n}
    if len(means) < k:
        raise ValueError(f"only {len(means)} heads are among the stored top scores of every seed; k = {k} needs "
                         "more stored scores (save the full scores)")
    order = sorted(means, key=lambda h: (-means[h], h))
    top = order[:k]
    partial = {h: (sum(v.values()) + sum(floors[i] for i in range(n) if i not in v)) / n
               for h, v in per.items() if len(v) < n}
    unstored = [] if n_heads is not None and len(per) >= n_heads else [sum(floors) / n]   # a head in no row
    bound = max([*partial.values(), *unstored], default=float("-inf"))
    kth = means[top[-1]]
    if bound >= kth:
        raise ValueError(f"the top {k} is not determined by the stored scores: the {k}th mean is {kth:.4f} and a "
                         f"head outside them could reach {bound:.4f}")
    return top, means, {"kth_mean": kth, "max_bound_outside": bound, "floors": floors}


def recomputed_scores(model, study, settings: dict, seed: int) -> dict[str, Any]:
    """Every eligible head's score of one selection seed, computed again as the study's head arm does
    (`study.head_scores` on the same attribution split), as a selection's `scores_top` rows."""
    probe = study._probe(model.tokenizer, "no-gold", seed, settings)
    scores, clean, dropped = study.head_scores(model, probe, seed, settings)
    ok = scores.eligible()
    rows = [[l, h, float(scores.scores[l, h])] for l in range(ok.shape[0]) for h in range(ok.shape[1]) if ok[l, h]]
    return {"seed": seed, "scores_top": sorted(rows, key=lambda r: -r[2]), "n_attribution": len(clean),
            "n_dropped": len(dropped)}


def stored_agree(stored: dict, full: dict) -> float:
    """The largest difference between a selection's stored top scores and the same heads' recomputed ones."""
    again = {(l, h): v for l, h, v in full["scores_top"]}
    return max(abs(v - again[(l, h)]) for l, h, v in stored["scores_top"])


def percentile(value: float, reference: Sequence[float]) -> float:
    """Where `value` stands among `reference` (NaNs left out), in percent: the share below it, ties half."""
    ref = np.asarray(reference, float)
    ref = ref[np.isfinite(ref)]
    if not len(ref) or not math.isfinite(value):
        return float("nan")
    return float(100 * ((ref < value).sum() + 0.5 * (ref == value).sum()) / len(ref))


def standing(values: np.ndarray, top: Sequence[Head]) -> list[dict[str, Any]]:
    """Each top head's value of a [layers, heads] map and its percentile among every head not in `top`."""
    chosen = set(top)
    others = [float(values[l, h]) for l in range(values.shape[0]) for h in range(values.shape[1])
              if (l, h) not in chosen]
    return [{"value": float(values[head]), "percentile": percentile(float(values[head]), others)} for head in top]


# ---------------------------------------------------------------- label attention and the OV check


def label_maps(model, prompts) -> dict[str, Any]:
    """Label attention and the OV margin of every head, means over the prompts (those whose demo labels
    can be located in the tokens; the others are counted and dropped)."""
    from mechcopy.label_attention import label_attention, label_positions

    kept, dropped = [], []
    for p in prompts:
        try:
            label_positions(model, p)
            kept.append(p)
        except ValueError as e:
            dropped.append(f"{p.task}: {e}")
    la = label_attention(model, kept)
    return {"n_prompts": len(kept), "n_dropped": len(dropped), "dropped": dropped[:10],
            "outcomes": {o: la.outcomes.count(o) for o in ("correct", "copy", "other")},
            "label_share_mean": float(la.label_share.mean()),
            "to_labels": la.mean("to_labels").tolist(), "ov_margin": la.mean("ov_margin").tolist(),
            "ov_positive_share": (la.ov_margin > 0).float().mean(0).tolist()}


# ---------------------------------------------------------------- activation patching


def patch_effects(model, swap, heads: Sequence[Head]) -> dict[str, Any]:
    """One label swap: T = logit(X) - logit(gold) at the last position on the clean prompt and on its
    counterfactual, and the change of T when one head's `z` comes from the counterfactual run, at the
    last position (`last`) or at every position (`all`), per head of `heads`. Each layer's patches run
    in one batch from the clean run's residual stream entering that layer (`head_patching`'s runner)."""
    import torch

    from mechcopy.arch import arch_of
    from mechcopy.head_patching import _caches, _run_groups

    arch = arch_of(model)
    clean, cf = arch.tokens(model, swap.clean.text), arch.tokens(model, swap.counterfactual.text)
    if clean.shape != cf.shape:
        raise ValueError(f"label swap of {swap.clean.query!r}: the prompts differ in length; a swap keeps them aligned")
    source, target = _caches(model, cf, clean, "z")
    with torch.no_grad():
        t_clean, t_cf = (float(lg[0, swap.x_id] - lg[0, swap.gold_id]) for lg in
                         (arch.last_logits(model, clean), arch.last_logits(model, cf)))
    out: dict[str, Any] = {"t_clean": t_clean, "t_cf": t_cf, "last": [0.0] * len(heads), "all": [0.0] * len(heads)}
    for layer in sorted({l for l, _ in heads}):
        idx = [i for i, (l, _) in enumerate(heads) if l == layer]
        groups = [(heads[i][1], positions, None) for i in idx for positions in ([clean.shape[1] - 1], None)]
        logits = _run_groups(model, layer, "z", source, target[f"blocks.{layer}.hook_resid_pre"], groups)[:, 0]
        t = (logits[:, swap.x_id] - logits[:, swap.gold_id]).tolist()
        for j, i in enumerate(idx):
            out["last"][i], out["all"][i] = t[2 * j] - t_clean, t[2 * j + 1] - t_clean
    return out


def patching(model, swaps, heads: Sequence[Head], dropped: Sequence[str]) -> dict[str, Any]:
    """`patch_effects` over every swap: per pair and their means."""
    pairs = [patch_effects(model, w, heads) for w in swaps]
    return {"heads": [list(h) for h in heads], "n_pairs": len(pairs), "n_dropped": len(dropped),
            "dropped": list(dropped[:20]), "tasks": [w.clean.task for w in swaps], "pairs": pairs}


def patching_summary(result: dict[str, Any], scores: Sequence[float]) -> dict[str, Any]:
    """Means (with standard errors) of the patching effects per head, and the Spearman correlation of the
    heads' patching effect (-dT: larger = carries more of T) with their attribution `scores`."""
    from scipy.stats import spearmanr

    pairs = result["pairs"]
    t_clean = np.array([p["t_clean"] for p in pairs])
    t_cf = np.array([p["t_cf"] for p in pairs])
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_dropped": result["n_dropped"],
                           "t_clean_mean": float(t_clean.mean()), "t_cf_mean": float(t_cf.mean()),
                           "gap_mean": float((t_clean - t_cf).mean())}
    for where in ("last", "all"):
        d = np.array([p[where] for p in pairs])                     # [pairs, heads]
        rho, p_value = spearmanr(list(scores), -d.mean(0))
        out[where] = {"mean": d.mean(0).tolist(), "se": (d.std(0, ddof=1) / math.sqrt(len(d))).tolist(),
                      "share_of_gap": (-d.mean(0) / (t_clean - t_cf).mean()).tolist(),
                      "rank": (np.argsort(np.argsort(d.mean(0), kind="stable"), kind="stable") + 1).tolist(),
                      "spearman": float(rho), "spearman_p": float(p_value)}
    return out


# ---------------------------------------------------------------- the run


def _rounded(x: Any, nd: int = 4) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, nd)
    if isinstance(x, list):
        return [_rounded(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v, nd) for k, v in x.items()}
    return x


def main(argv=None) -> int:
    from mechcopy.commands.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", type=Path, required=True, help="the study's work folder (its heads-last selections)")
    ap.add_argument("--arm", default="heads-last", help="the arm whose selections hold the head scores")
    ap.add_argument("--pilot", type=Path, default=Path("docs/data/copy_probe_pilot.json"),
                    help="the copy-probe pilot that fixes the model's probe tasks")
    ap.add_argument("--k", type=at_least(1), default=8)
    ap.add_argument("--n-test", type=at_least(1), default=None, help="probe test prompts per task (default: the study's)")
    ap.add_argument("--n", type=at_least(1), default=None, help="held-out prompts per task (default: the study's)")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path("docs/data"))
    ap.add_argument("--figures", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=at_least(1), default=1)
    args = ap.parse_args(argv)

    import torch

    from mechcopy import load_model, viz
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.io import read_json, write_json_atomic
    from mechcopy.provenance import git_revision, run_stages
    from mechcopy.suite import build_prompt_sets
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.pairs import label_swaps

    t0 = time.time()
    torch.set_num_threads(args.threads)
    study = study_module()
    kept, why = study.probe_tasks(args.model, args.pilot)
    s = {**study.SETTINGS, "probe_tasks": kept}
    if args.n_test is not None:
        s["n_test"] = args.n_test
    if args.n is not None:
        s["n"] = args.n
    paths = sorted(args.work.glob(f"{args.arm}_select_seed*.json"))
    if len(paths) != len(s["selection_seeds"]):
        raise SystemExit(f"{args.work}: {len(paths)} {args.arm} selections, the study has {len(s['selection_seeds'])} "
                         "seeds; run the study's select stage first")
    selections = [read_json(p) for p in paths]
    model_name = Path(args.model).name
    out_dir = args.out_dir or Path(f"results/copy_heads/{model_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    scores_from, agreement, score_seconds = "the selections' stored top scores", None, {}
    try:
        top, means, determined = top_heads(selections, args.k)
    except ValueError as e:          # not determined by the stored rows: every head's score again, per seed
        print(f"{e}; computing every head's score again", file=sys.stderr)
        seeds = [int(sel["seed"]) for sel in selections]
        run_stages([(f"scores_seed{seed}", partial(recomputed_scores, model, study, s, seed)) for seed in seeds], out_dir)
        done = {seed: read_json(out_dir / f"scores_seed{seed}.json") for seed in seeds}
        full = [done[seed]["result"] for seed in seeds]
        score_seconds = {f"scores_seed{seed}": done[seed]["seconds"] for seed in seeds}
        agreement = [stored_agree(a, b) for a, b in zip(selections, full)]
        top, means, determined = top_heads(full, args.k, n_heads=model.cfg.n_layers * model.cfg.n_heads)
        selections, scores_from = full, "every head's score computed again (analyses/copy_mechanism.py head_scores)"

    def probe_test_labels():
        return label_maps(model, study._probe(model.tokenizer, "copy-control", s["probe_seed"], s).test)

    def heldout_labels():
        tasks = load_tasks(",".join(s["heldout_tasks"]))
        sets = build_prompt_sets(model, tasks, s["shots"], s["n"], s["prompt_seed"], gold_in_demos=False)
        return label_maps(model, [p for t in tasks for p in sets[t.name].prompts])

    def patch_test():
        test = study._probe(model.tokenizer, "no-gold", s["probe_seed"], s).test
        swaps, dropped = label_swaps(test, model.tokenizer, seed=s["probe_seed"],
                                     choose_x=lambda p: study.preferred_demo_label(model, p))
        return patching(model, swaps, top, dropped)

    run_stages([("labels_probe_test", probe_test_labels), ("labels_heldout", heldout_labels),
                ("patch_probe_test", patch_test)], out_dir)
    stage = {n: read_json(out_dir / f"{n}.json") for n in ("labels_probe_test", "labels_heldout", "patch_probe_test")}
    scores = [means[h] for h in top]
    patch = patching_summary(stage["patch_probe_test"]["result"], scores)
    labels: dict[str, Any] = {}
    for key, n in (("probe_test", "labels_probe_test"), ("heldout", "labels_heldout")):
        r = stage[n]["result"]
        maps = {f: np.array(r[f], float) for f in ("to_labels", "ov_margin")}
        labels[key] = {**{k: r[k] for k in ("n_prompts", "n_dropped", "dropped", "outcomes", "label_share_mean")},
                       "others_median": {f: float(np.nanmedian([m[l, h] for l in range(m.shape[0]) for h in range(m.shape[1])
                                                                if (l, h) not in top])) for f, m in maps.items()},
                       "maps": {f: m.tolist() for f, m in maps.items()}, "standing": {f: standing(m, top) for f, m in maps.items()},
                       "ov_positive_share": [r["ov_positive_share"][l][h] for l, h in top]}
    rows = []
    for i, h in enumerate(top):
        row: dict[str, Any] = {"head": name(h), "layer": h[0], "index": h[1], "rank": i + 1, "score": means[h],
                               "score_per_seed": [next(r[2] for r in sel["scores_top"] if (r[0], r[1]) == h)
                                                  for sel in selections]}
        for key in ("probe_test", "heldout"):
            for f in ("to_labels", "ov_margin"):
                row[f"{key}_{f}"] = labels[key]["standing"][f][i]["value"]
                row[f"{key}_{f}_pct"] = labels[key]["standing"][f][i]["percentile"]
        for where in ("last", "all"):
            row[f"patch_{where}"] = patch[where]["mean"][i]
            row[f"patch_{where}_se"] = patch[where]["se"][i]
            row[f"patch_{where}_rank"] = patch[where]["rank"][i]
        rows.append(row)
    command = (f"python analyses/copy_heads.py --model {args.model} --work {args.work} --pilot {args.pilot}"
               + (f" --n-test {args.n_test}" if args.n_test is not None else "") + (f" --n {args.n}" if args.n is not None else ""))
    doc = {"what": "the study's top heads by the head attribution: label attention, OV check, activation patching",
           "command": command, "git_revision": git_revision(), "model": model_fingerprint(model),
           "settings": {"arm": args.arm, "k": args.k, "selection_files": [str(p) for p in paths],
                        "probe_tasks": kept, "probe_tasks_why": why, "shots": s["shots"], "n_test_per_task": s["n_test"],
                        "heldout_tasks": s["heldout_tasks"], "n_per_heldout_task": s["n"], "prompt_seed": s["prompt_seed"],
                        "probe_seed": s["probe_seed"], "threads": args.threads},
           "attribution": {"scores_from": scores_from, "stored_vs_recomputed_max_abs": agreement,
                           "determined": determined, "means_complete": {name(h): v for h, v in sorted(means.items())}},
           "heads": rows, "labels": labels,
           "patching": {**{k: v for k, v in patch.items() if k not in ("last", "all")},
                        **{w: {k: patch[w][k] for k in ("spearman", "spearman_p", "share_of_gap")} for w in ("last", "all")},
                        "read_as": "change of T = logit(X) - logit(gold) at the last position when one head's z comes "
                                   "from the label-swap counterfactual run; rank 1 = the largest drop of T"},
           "seconds": {**score_seconds, **{n: stage[n]["seconds"] for n in stage}, "total_this_run": round(time.time() - t0, 1)}}
    doc = _rounded(doc)
    out = write_json_atomic(args.data / f"copy_mechanism_heads_{model_name}.json", doc)
    shape = np.array(labels["heldout"]["maps"]["to_labels"]).shape
    score_map, patch_map = np.full(shape, np.nan), np.full(shape, np.nan)
    for h, v in means.items():
        score_map[h] = v
    for i, h in enumerate(top):
        patch_map[h] = patch["last"]["mean"][i]
    panels: dict[str, dict[str, Any]] = {}
    for key, what in (("probe_test", "copy probe test (copy-control)"), ("heldout", "held-out tasks (no-gold)")):
        panels[f"attention to demo labels\n{what}"] = {"values": np.array(labels[key]["maps"]["to_labels"], float),
                                                        "label": "attention", "centre": False, "outline": top}
        panels[f"OV margin of the attended label\n{what}"] = {"values": np.array(labels[key]["maps"]["ov_margin"], float),
                                                               "label": "logit / attention", "outline": top}
        if key == "probe_test":
            panels["patching z from the label swap\nlast position, probe test"] = {
                "values": patch_map, "label": "change of logit(X) - logit(gold)", "outline": top}
        else:
            panels["attribution: mean IG score over seeds" + ("\n(stored top scores)" if agreement is None else "")] = {
                "values": score_map, "label": "score", "outline": top}
    fig = viz.plot_head_maps(panels, f"{model_name}: the attribution's top {args.k} heads outlined")
    figure = viz.save_figure(fig, args.figures / f"copy_mechanism_heads_{model_name}.png", dpi=80)
    print(f"-> {out}, {figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
