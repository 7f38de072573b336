"""The full method on the model organisms: probe -> IG attribution -> selection -> pruning -> evaluation.

    python analyses/organisms.py results/organisms/transformer-s0 results/organisms/mamba-s0 \
        --out results/organisms/analysis [--figures docs/figures]

For each organism folder (from `mechcopy train-organism`):
1. ICL accuracy and copy rate on held-out functions (maps, shifts), the class family and the probe.
2. IG on the probe's attribution split (target: contrast = logit(best demo label) - logit(gold)),
   copy scores (min-max per prompt, mean over prompts).
3. k chosen on the probe's *dev* split only: the k with the best dev accuracy among those that keep
   the organism's general ability (query accuracy on *training-split* episodes of the map and class
   families) within 5 points. This stands in for the perplexity bound of `pruning.sweep_k`, which
   measures English text the organisms never saw.
4. Evaluation of the selected set against 5 random layer-matched sets and the bottom-score set
   (`pruning.conditions`) on held-out maps, held-out shifts, the class family and a fresh probe test split.
Intervals are 95% bootstrap CIs over prompts (and the spread of the 5 random sets); organisms trained
with several seeds are listed separately, so their spread is the interval over training seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from mechcopy.attribution import copy_scores, integrated_gradients
from mechcopy.evaluation import evaluate
from mechcopy.organisms.data import organism_prompts, probe_splits
from mechcopy.organisms.train import load_organism
from mechcopy.pruning import conditions, pruning_hooks, select
from mechcopy.sites import model_fingerprint, write_json_atomic

EVAL = ("map-heldout", "shift-heldout", "class", "probe-test", "probe-same")
GENERAL = ("map-train", "class")  # general ability: training-split functions


def _prompts(name: str, tok, n: int, k: int, seed: int):
    if name == "probe-test":
        return list(organism_prompts("probe", tok, n, k, seed + 20_000).prompts)
    return list(organism_prompts(name, tok, n, k, seed).prompts)


def choose_k(model, scores, dev, general, ks, max_drop=0.05, seed=0) -> dict:
    """Dev-probe accuracy and general-ability accuracy for each k (global top-k); pick the best feasible k."""
    base_dev = evaluate(model, dev, condition="unpruned", seed=seed, n_boot=100)
    base_gen = evaluate(model, general, condition="unpruned", seed=seed, n_boot=100).accuracy
    rows = []
    for k in ks:
        hooks = pruning_hooks(model, select(scores, "global", k=k))
        d = evaluate(model, dev, fwd_hooks=hooks, condition=f"k={k}", seed=seed, n_boot=100)
        g = evaluate(model, general, fwd_hooks=hooks, condition=f"k={k}", seed=seed, n_boot=100).accuracy
        rows.append({"k": k, "dev_accuracy": d.accuracy, "dev_copy_rate": d.copy_rate, "general_accuracy": g,
                     "feasible": g >= base_gen - max_drop})
    feasible = [r for r in rows if r["feasible"]]
    chosen = max(feasible, key=lambda r: (r["dev_accuracy"], -r["k"]))["k"] if feasible else min(ks)
    return {"baseline": {"dev_accuracy": base_dev.accuracy, "dev_copy_rate": base_dev.copy_rate,
                         "general_accuracy": base_gen},
            "rows": rows, "chosen_k": chosen, "max_general_drop": max_drop, "any_feasible": bool(feasible)}


def run_organism(folder: str | Path, n_eval: int = 200, n_attr: int = 100, n_dev: int = 100, k_shots: int = 4,
                 ig_steps: int = 20, n_random: int = 5, seed: int = 0,
                 ks=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Every number of the organism write-up for one organism folder."""
    torch.manual_seed(seed)
    t0 = time.time()
    model = load_organism(folder)
    tok = model.tokenizer
    meta = json.loads((Path(folder) / "organism.json").read_text())
    sets = {name: _prompts(name, tok, n_eval, k_shots, seed) for name in EVAL}
    general = [p for name in GENERAL for p in _prompts(name, tok, n_dev, k_shots, seed + 30_000)]
    attr, dev = probe_splits(tok, n_attr=n_attr, n_dev=n_dev, k=k_shots, seed=seed)

    unpruned = {name: evaluate(model, ps, condition="unpruned", seed=seed).to_json() for name, ps in sets.items()}
    ig = integrated_gradients(model, attr, target="contrast", steps=ig_steps, method="fast")
    scores = copy_scores(model, ig, normalisation="minmax", seed=seed)
    sweep = choose_k(model, scores, dev, general, ks, seed=seed)
    neurons = select(scores, "global", k=sweep["chosen_k"])
    table = []
    for cond, hooks in conditions(model, neurons, n_random=n_random, seed=seed, scores=scores):
        for name, ps in sets.items():
            r = evaluate(model, ps, fwd_hooks=hooks, condition=cond, seed=seed)
            table.append({"set": name, "condition": cond, "accuracy": r.accuracy, "accuracy_ci": list(r.accuracy_ci),
                          "copy_rate": r.copy_rate, "copy_rate_ci": list(r.copy_rate_ci), "n": r.n})
    for name in EVAL:
        u = unpruned[name]
        table.insert(0, {"set": name, "condition": "unpruned", "accuracy": u["accuracy"],
                         "accuracy_ci": u["accuracy_ci"], "copy_rate": u["copy_rate"],
                         "copy_rate_ci": u["copy_rate_ci"], "n": u["n"]})
    layer_share = scores.scores.clamp_min(0).sum(1) / scores.scores.clamp_min(0).sum()
    return {
        "organism": str(folder), "arch": meta["arch"], "train": meta["train"],
        "model": model_fingerprint(model), "seed": seed,
        "params": {"n_eval": n_eval, "n_attr": n_attr, "n_dev": n_dev, "k_shots": k_shots, "ig_steps": ig_steps,
                   "n_random": n_random, "ks": list(ks), "target": "contrast", "normalisation": "minmax",
                   "selection": "global"},
        "unpruned": {k: {kk: v[kk] for kk in ("accuracy", "accuracy_ci", "copy_rate", "copy_rate_ci",
                                              "copy_share_of_errors", "other_rate", "n")}
                     for k, v in unpruned.items()},
        "ig": {"completeness_error_median": float(ig.completeness_error().median()),
               "target_clean_mean": float(ig.target_clean.mean())},
        "scores_per_layer": scores.scores.tolist(),
        "score_mass_per_layer": layer_share.tolist(),
        "sweep": sweep,
        "neurons": [list(n) for n in neurons.neurons],
        "neurons_per_layer_selected": neurons.layer_counts(model.cfg.n_layers),
        "table": table,
        "seconds": time.time() - t0,
    }


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per organism, set and condition group (random sets averaged, their min..max kept)."""
    rows = []
    for res in results:
        name = Path(res["organism"]).name
        for s in EVAL:
            cells = [r for r in res["table"] if r["set"] == s]
            for cond in ("unpruned", "pruned", "bottom"):
                for r in cells:
                    if r["condition"] == cond:
                        rows.append({"organism": name, "set": s, "condition": cond,
                                     "accuracy": r["accuracy"], "acc_lo": r["accuracy_ci"][0], "acc_hi": r["accuracy_ci"][1],
                                     "copy_rate": r["copy_rate"], "copy_lo": r["copy_rate_ci"][0],
                                     "copy_hi": r["copy_rate_ci"][1]})
            rnd = [r for r in cells if r["condition"].startswith("random")]
            if rnd:
                accs, cps = [r["accuracy"] for r in rnd], [r["copy_rate"] for r in rnd]
                rows.append({"organism": name, "set": s, "condition": f"random (x{len(rnd)})",
                             "accuracy": sum(accs) / len(accs), "acc_lo": min(accs), "acc_hi": max(accs),
                             "copy_rate": sum(cps) / len(cps), "copy_lo": min(cps), "copy_hi": max(cps)})
    by_arch: dict[str, list[dict]] = {}
    for res in results:
        by_arch.setdefault(res["arch"], []).append(res)
    for arch, group in by_arch.items():  # the interval over training seeds (min..max of the seeds)
        if len(group) < 2:
            continue
        names = {Path(r["organism"]).name for r in group}
        for s in EVAL:
            for cond in ("unpruned", "pruned", "bottom", f"random (x{group[0]['params']['n_random']})"):
                cells = [r for r in rows if r["organism"] in names and r["set"] == s and r["condition"] == cond]
                if len(cells) < 2:
                    continue
                accs, cps = [c["accuracy"] for c in cells], [c["copy_rate"] for c in cells]
                rows.append({"organism": f"{arch} ({len(cells)} seeds)", "set": s, "condition": cond,
                             "accuracy": sum(accs) / len(accs), "acc_lo": min(accs), "acc_hi": max(accs),
                             "copy_rate": sum(cps) / len(cps), "copy_lo": min(cps), "copy_hi": max(cps)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a Markdown table (accuracy and copy rate with their intervals)."""
    lines = ["| organism | set | condition | accuracy [95% CI] | copy rate [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['organism']} | {r['set']} | {r['condition']} | {r['accuracy']:.2f} "
                     f"[{r['acc_lo']:.2f}, {r['acc_hi']:.2f}] | {r['copy_rate']:.2f} [{r['copy_lo']:.2f}, {r['copy_hi']:.2f}] |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], folders: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # 1. loss curves and held-out accuracy during training
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    for folder in folders:
        lp = Path(folder) / "loss.json"
        if not lp.exists():
            continue
        c = json.loads(lp.read_text())
        w = max(1, len(c["loss"]) // 60)
        sm = [sum(c["loss"][i:i + w]) / len(c["loss"][i:i + w]) for i in range(0, len(c["loss"]), w)]
        axes[0].plot([c["step"][i] for i in range(0, len(c["loss"]), w)], sm, label=Path(folder).name)
        axes[1].plot(c["eval_step"], [e["map-heldout"] for e in c["eval"]], label=f"{Path(folder).name} map-heldout")
        axes[1].plot(c["eval_step"], [e["probe"] for e in c["eval"]], "--", label=f"{Path(folder).name} probe")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss (outputs)"), axes[0].legend(fontsize=6)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("query accuracy, k=4"), axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "organisms_training.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 2. pruning table: accuracy and copy rate per condition on each set
    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 5), dpi=80, squeeze=False)
    rows = summary_rows(results)
    for j, res in enumerate(results):
        name = Path(res["organism"]).name
        for i, metric in enumerate(("accuracy", "copy_rate")):
            ax = axes[i, j]
            conds = ["unpruned", "pruned", f"random (x{res['params']['n_random']})", "bottom"]
            for c_i, cond in enumerate(conds):
                vals = [next((r[metric] for r in rows if r["organism"] == name and r["set"] == s
                              and r["condition"] == cond), float("nan")) for s in EVAL]
                ax.bar([x + 0.2 * c_i for x in range(len(EVAL))], vals, width=0.2, label=cond)
            ax.set_xticks([x + 0.3 for x in range(len(EVAL))], EVAL, fontsize=7)
            ax.set_ylim(0, 1), ax.set_ylabel(metric), ax.set_title(f"{name} (k={len(res['neurons'])})", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "organisms_pruning.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 3. copy scores per neuron, sorted, per layer
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 2.6), dpi=80, squeeze=False)
    for j, res in enumerate(results):
        sc = torch.tensor(res["scores_per_layer"])
        for layer in range(sc.shape[0]):
            axes[0, j].plot(sc[layer].sort(descending=True).values, label=f"layer {layer}")
        axes[0, j].set_title(Path(res["organism"]).name, fontsize=8)
        axes[0, j].set_xlabel("neuron rank"), axes[0, j].set_ylabel("copy score"), axes[0, j].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "organisms_scores.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="organism folders from `mechcopy train-organism`")
    p.add_argument("--out", default="results/organisms/analysis")
    p.add_argument("--figures", default=None, help="also write the figures here (e.g. docs/figures)")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--n-attr", type=int, default=100)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse OUT/<organism>.json where it exists (tables and figures only)")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = []
    for folder in args.folders:
        cached = out / f"{Path(folder).name}.json"
        if args.reuse and cached.exists():
            res = json.loads(cached.read_text())
        else:
            res = run_organism(folder, n_eval=args.n_eval, n_attr=args.n_attr, ig_steps=args.ig_steps, seed=args.seed)
            write_json_atomic(cached, res)
        results.append(res)
        print(f"{folder}: done in {res['seconds']:.0f} s, k={len(res['neurons'])}", file=sys.stderr)
    rows = summary_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(markdown_table(rows))
    for r in rows:
        print(f"{r['organism']:>16} {r['set']:>14} {r['condition']:>12}  acc {r['accuracy']:.2f} "
              f"[{r['acc_lo']:.2f}, {r['acc_hi']:.2f}]  copy {r['copy_rate']:.2f} [{r['copy_lo']:.2f}, {r['copy_hi']:.2f}]")
    for path in plot(results, args.folders, Path(args.figures) if args.figures else out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
