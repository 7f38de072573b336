"""The full method on the model organisms, over training seeds: tables and figures for docs/organisms.md.

    python analyses/organisms.py results/organisms/{transformer,mamba}-s{0,1,2} \
        --out results/organisms/analysis [--figures docs/figures] [--reuse]

For each organism folder (from `mechcopy train-organism`) `mechcopy.organisms.method.run_method` runs
probe -> IG -> k on dev -> pruned vs random vs bottom -> task vectors, once per probe (`probe`: class
family; `probe-shift`: training shifts), and its result is saved as OUT/<organism>.json at once.
`seed_summary` then gives every number as the mean and 95% t interval over the training seeds of
each architecture. Written: OUT/summary.csv (every row), OUT/table.md (the write-up's tables),
OUT/task_vectors.csv, and the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from mechcopy.organisms.method import ORGANISM_FIND, MethodConfig, run_method, seed_summary, task_vector_summary
from mechcopy.organisms.train import load_organism
from mechcopy.io import write_atomic, write_json_atomic

CONDITIONS = ("unpruned", "pruned", "random", "bottom")
SETS = ("map-heldout", "shift-heldout", "class", "probe-test", "probe-same", "probe-shift-test")
ARCH_COLOURS = {"transformer": "tab:blue", "mamba": "tab:orange"}


def fmt(mean: float, lo: float, hi: float, rate: bool = True) -> str:
    """`mean [lo, hi]`; a rate's interval is clipped to [0, 1] (a difference's is not)."""
    if math.isnan(lo):
        return f"{mean:.2f}"
    if rate:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def sweep_table(results: list[dict]) -> list[str]:
    """Per organism and probe: dev accuracy unpruned, the best k and its dev accuracy, and the chosen k."""
    lines = ["| organism | probe | dev accuracy unpruned | best feasible k: dev accuracy | chosen k | "
             "dev copy rate unpruned -> chosen |", "|---|---|---|---|---|---|"]
    for res in results:
        for probe, m in res["methods"].items():
            sw = m["sweep"]
            chosen = next(r for r in sw["rows"] if r["k"] == m["pruned_k"])
            best = "none feasible" if not any(r["feasible"] for r in sw["rows"]) else f"{chosen['dev_accuracy']:.2f}"
            lines.append(f"| {Path(res['organism']).name} | {probe} | {sw['baseline']['dev_accuracy']:.2f} | {best} | "
                         f"{m['pruned_k']} | {sw['baseline']['dev_copy_rate']:.2f} -> {chosen['dev_copy_rate']:.2f} |")
    return lines


def markdown_tables(summary: pd.DataFrame, tv: pd.DataFrame, results: list[dict]) -> str:
    """ICL and copy rates of the unpruned organisms; the pruning table per probe; task vectors."""
    def row_cells(r):
        rate = r.condition != "pruned - unpruned"
        return (fmt(r.accuracy, r.acc_lo, r.acc_hi, rate), fmt(r.copy_rate, r.copy_lo, r.copy_hi, rate),
                ", ".join(f"{a:.2f}" for a in r.accuracy_per_seed))

    out = ["## Unpruned organisms (mean [95% t interval] over training seeds)", "",
           "| arch | set | seeds | accuracy | copy rate | accuracy per seed |", "|---|---|---|---|---|---|"]
    base = summary[(summary.condition == "unpruned") & (summary.probe == summary.probe.iloc[0])]
    for r in base.itertuples():
        out.append(f"| {r.arch} | {r.set} | {r.seeds} | " + " | ".join(row_cells(r)) + " |")
    for probe in sorted(summary.probe.unique()):
        out += ["", f"## Pruning with neurons found on `{probe}` (mean [95% t interval] over seeds)", "",
                "| arch | set | condition | accuracy | copy rate | accuracy per seed |", "|---|---|---|---|---|---|"]
        part = summary[(summary.probe == probe) & (summary.condition != "unpruned")]
        for r in part.itertuples():
            out.append(f"| {r.arch} | {r.set} | {r.condition} | " + " | ".join(row_cells(r)) + " |")
    out += ["", "## The k sweep on each probe's dev split (feasible: general accuracy within 5 points)", ""]
    out += sweep_table(results)
    if len(tv):
        out += ["", "## Task vectors (test accuracy, mean [95% t interval] over seeds)", "",
                "| arch | function | condition | task vector | zero-shot | ICL | best layer per seed |",
                "|---|---|---|---|---|---|---|"]
        for r in tv.itertuples():
            out.append(f"| {r.arch} | {r.task.removeprefix('organism-')} | {r.condition} | "
                       f"{fmt(r.test_accuracy, r.test_accuracy_lo, r.test_accuracy_hi)} | "
                       f"{fmt(r.zero_shot_accuracy, r.zero_shot_accuracy_lo, r.zero_shot_accuracy_hi)} | "
                       f"{fmt(r.icl_accuracy, r.icl_accuracy_lo, r.icl_accuracy_hi)} | {r.best_layers} |")
    return "\n".join(out) + "\n"


def plot(results: list[dict], folders: list[str], summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # 1. training: loss and held-out map accuracy, every seed
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    labelled = set()
    for folder, res in zip(folders, results):
        lp = Path(folder) / "loss.json"
        if not lp.exists():
            continue
        c, colour = json.loads(lp.read_text()), ARCH_COLOURS[res["arch"]]
        w = max(1, len(c["loss"]) // 60)
        idx = range(0, len(c["loss"]), w)
        n_seeds = sum(r["arch"] == res["arch"] for r in results)
        axes[0].plot([c["step"][i] for i in idx], [sum(c["loss"][i:i + w]) / len(c["loss"][i:i + w]) for i in idx],
                     color=colour, alpha=0.7,
                     label=None if res["arch"] in labelled else f"{res['arch']} ({n_seeds} seeds)")
        labelled.add(res["arch"])
        axes[1].plot(c["eval_step"], [e["map-heldout"] for e in c["eval"]], color=colour, alpha=0.7)
        axes[1].plot(c["eval_step"], [e["shift-heldout"] for e in c["eval"]], ":", color=colour, alpha=0.7)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss (outputs)"), axes[0].legend(fontsize=6)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("held-out accuracy, k=4 (solid: maps, dotted: shifts)")
    axes[1].set_ylim(0, 1)
    axes[1].yaxis.label.set_size(7)
    fig.tight_layout()
    paths.append(out_dir / "organisms_training.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 2. pruning: accuracy and copy rate per set and condition, error bars over seeds
    panels = [(a, p) for a in ARCH_COLOURS for p in sorted(summary.probe.unique()) if a in set(summary.arch)]
    sets = [s for s in SETS if s in set(summary.set)]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.5), dpi=80, squeeze=False)
    for j, (arch, probe) in enumerate(panels):
        for i, (metric, lo, hi) in enumerate((("accuracy", "acc_lo", "acc_hi"), ("copy_rate", "copy_lo", "copy_hi"))):
            ax = axes[i, j]
            for c_i, cond in enumerate(CONDITIONS):
                part = summary[(summary.arch == arch) & (summary.probe == probe) & (summary.condition == cond)]
                part = part.set_index("set").reindex(sets)
                err = [(part[metric] - part[lo].clip(lower=0)).fillna(0).clip(lower=0),
                       (part[hi].clip(upper=1) - part[metric]).fillna(0).clip(lower=0)]
                ax.bar([x + 0.2 * c_i for x in range(len(sets))], part[metric], width=0.2, yerr=err, capsize=2,
                       label=cond)
            ax.set_xticks([x + 0.3 for x in range(len(sets))], sets, fontsize=6, rotation=30, ha="right")
            ax.set_ylim(0, 1.05), ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{arch}, neurons from {probe}", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "organisms_pruning.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    # 3. copy scores per neuron, sorted, per layer: one panel per arch and probe, every seed
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.6), dpi=80, squeeze=False)
    for j, (arch, probe) in enumerate(panels):
        same = [r for r in results if r["arch"] == arch and probe in r["methods"]]
        for n, res in enumerate(same):
            sc = torch.tensor(res["methods"][probe]["scores_per_layer"])
            for layer in range(sc.shape[0]):
                axes[0, j].plot(sc[layer].sort(descending=True).values, color=f"C{layer}", alpha=0.6,
                                label=f"layer {layer}" if n == 0 else None)
        axes[0, j].set_title(f"{arch}, {probe}", fontsize=8)
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
    p.add_argument("--n-eval", type=int, default=MethodConfig.n_eval)
    p.add_argument("--n-attr", type=int, default=ORGANISM_FIND.n, help="attribution prompts (FindConfig.n)")
    p.add_argument("--ig-steps", type=int, default=ORGANISM_FIND.steps, help="IG steps (FindConfig.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--reuse", action="store_true", help="reuse OUT/<organism>.json where it exists")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    config = MethodConfig(find=replace(ORGANISM_FIND, n=args.n_attr, steps=args.ig_steps, seed=args.seed),
                          n_eval=args.n_eval)
    results = []
    for folder in args.folders:
        cached = out / f"{Path(folder).name}.json"
        if args.reuse and cached.exists():
            res = json.loads(cached.read_text())
        else:
            res = {"organism": str(folder), **run_method(load_organism(folder), config)}
            res["train"] = json.loads((Path(folder) / "organism.json").read_text())["result"]
            write_json_atomic(cached, res)
        results.append(res)
        ks = {probe: len(m["neurons"]) for probe, m in res["methods"].items()}
        print(f"{folder}: done in {res['seconds']:.0f} s, k={ks}", file=sys.stderr)
    summary = pd.DataFrame(seed_summary(results))
    rank = {name: i for i, name in enumerate(SETS + CONDITIONS + ("pruned - unpruned",))}
    summary = summary.sort_values(["arch", "probe", "set", "condition"],
                                  key=lambda col: col.map(rank) if col.name in ("set", "condition") else col)
    tv = pd.DataFrame(task_vector_summary(results))
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "summary.csv", index=False)
    tv.to_csv(out / "task_vectors.csv", index=False)
    write_atomic(out / "table.md", markdown_tables(summary, tv, results))
    print(markdown_tables(summary, tv, results))
    for path in plot(results, args.folders, summary, Path(args.figures) if args.figures else out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
