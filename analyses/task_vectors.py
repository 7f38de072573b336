"""Task vectors, unpruned vs pruned, for several tasks: table (markdown) and per-layer figure.

    python analyses/task_vectors.py --model smollm2-135m --neurons results/attribution/smollm2-135m.neurons.json

Writes results/task_vectors/<model>.json (one entry per task and condition, resumable: tasks already
in the file are skipped), results/task_vectors/<model>.md (the table) and the per-layer figure
(docs/figures/ if under 200 KB, else results/task_vectors/).

The default tasks are those with enough single-token answers on SmolLM2's tokenizer (task vectors use
single-token answers only; e.g. to_upper keeps 4 of 150 pairs and is left out). Layers: every second
one and the last (--layer-step). Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_TASKS = "antonyms,fr_en,list_first,person_language,to_lower,next_letter,present_past"


def table(results: list[dict]) -> str:
    rows = ["| task | condition | best layer (dev) | task vector (test) | TV copy rate | zero-shot | ICL | ICL copy rate | n |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["test_accuracy_ci"]
        rows.append(f"| {r['task']} | {r['condition']} | {r['best_layer']} | {r['test_accuracy']:.2f} "
                    f"[{lo:.2f}, {hi:.2f}] | {r['copy_rate']:.2f} | {r['zero_shot_accuracy']:.2f} | "
                    f"{r['icl_accuracy']:.2f} | {r['icl_copy_rate']:.2f} | {r['n_test']} |")
    return "\n".join(rows)


def figure(results: list[dict], model: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), sharey=True, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for r in (r for r in results if r["task"] == task):
            style = "-" if r["condition"] == "unpruned" else "--"
            line, = ax.plot(r["layers"], r["dev_accuracy"], style, marker=".", label=f"TV {r['condition']}")
            ax.axhline(r["icl_accuracy"], color=line.get_color(), ls=":", lw=1, label=f"ICL {r['condition']}")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("layer L (inject after)", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("dev accuracy", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    shots = results[0]["config"]["shots"]
    fig.suptitle(f"Task-vector dev accuracy by layer, {model} (dotted: {shots}-shot ICL on test)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--neurons", help="NeuronSet JSON from `mechcopy find` (adds the pruned condition)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--n-dev", type=int, default=15)
    ap.add_argument("--layer-step", type=int, default=2, help="sweep every k-th layer (and the last)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="results/task_vectors")
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)

    from mechcopy.io import write_json_atomic

    out_dir = Path(args.out_dir)
    path = out_dir / f"{args.model}.json"
    done = json.loads(path.read_text()) if path.exists() else {"results": []}
    if not args.plot_only:
        from mechcopy import load_model
        from mechcopy.neurons import NeuronSet, model_fingerprint
        from mechcopy.task_vectors import TaskVectorConfig, task_vector_experiment
        from mechcopy.tasks import load_tasks

        model = load_model(args.model)
        neurons = NeuronSet.load(args.neurons) if args.neurons else None
        n_layers = model.cfg.n_layers
        layers = tuple(sorted(set(range(0, n_layers, args.layer_step)) | {n_layers - 1}))
        config = TaskVectorConfig(shots=args.shots, n_dev=args.n_dev, n_test=args.n, seed=args.seed, layers=layers)
        conditions = [("unpruned", [])]
        if neurons is not None:
            from mechcopy.pruning import pruning_hooks

            conditions.append(("pruned", pruning_hooks(model, neurons)))
        done.update(model=model_fingerprint(model), config=config.to_json())
        if neurons is not None:
            done.update(neurons=args.neurons, n_neurons=len(neurons))
        for task in load_tasks(args.tasks):
            have = {(r["task"], r["condition"]) for r in done["results"]}
            try:
                split = config.split(task, model.tokenizer)
            except ValueError as e:
                print(f"{task.name}: skipped ({e})")
                continue
            for name, hooks in conditions:
                if (task.name, name) in have:
                    continue
                r = task_vector_experiment(model, task, config, hooks, name, split)
                done["results"].append(r.to_json())
                write_json_atomic(path, done)
                print(f"{r.task:18s} {r.condition:9s} L*={r.best_layer:2d} TV {r.test_accuracy:.2f} "
                      f"copy {r.copy_rate:.2f} zero-shot {r.zero_shot_accuracy:.2f} ICL {r.icl_accuracy:.2f}",
                      flush=True)
    results = sorted(done["results"], key=lambda r: (r["task"], r["condition"] != "unpruned"))
    md = table(results)
    (out_dir / f"{args.model}.md").write_text(md + "\n")
    print(md)
    fig = figure(results, args.model, out_dir / f"task_vectors_{args.model}.png")
    if fig.stat().st_size < 200_000:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        fig = fig.replace(Path(args.figures) / fig.name)
    print(f"figure -> {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
