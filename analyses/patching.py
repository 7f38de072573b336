"""Activation-patching heatmap (component x layer x position) for one task and corruption.

    python analyses/patching.py --model smollm2-135m --task antonyms --corruption shuffled_labels --n 6 --shots 3

Runs `mechcopy.patching.activation_patching` unless results/patching/<model>_<task>_<corruption>.json
exists (the same file `mechcopy patch --out` writes), then draws one heatmap per component
(docs/figures/ if under 200 KB, else results/patching/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def heatmap(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.array(res["values"])                      # [component, layer, pos]
    comps, roles = res["components"], res["roles"]
    lim = max(1.0, float(np.abs(arr).max()))
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 0.16 * arr.shape[1] + 1.6), squeeze=False)
    for ax, comp, a in zip(axes[0], comps, arr):
        im = ax.imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_title(comp, fontsize=9)
        ax.set_xticks(range(len(roles)))
        ax.set_xticklabels(roles, rotation=90, fontsize=6)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="normalised logit diff")
    fig.suptitle(f"{res['model']['name']}: {res['task']}, clean -> {res['corruption']} "
                 f"({res['n_pairs']} pairs, {res['settings']['shots']}-shot)", fontsize=10)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--corruption", default="shuffled_labels")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neurons", help="also patch this NeuronSet")
    ap.add_argument("--comps", help="run only these components (comma-separated) into a part file; "
                    "when every component's part exists they are merged into the result")
    ap.add_argument("--out-dir", default="results/patching")
    ap.add_argument("--figures", default="docs/figures")
    args = ap.parse_args(argv)

    from mechcopy.io import write_json_atomic

    out_dir = Path(args.out_dir)
    path = out_dir / f"{args.model}_{args.task}_{args.corruption}.json"
    if args.comps and not path.exists():
        part = out_dir / f"{args.model}_{args.task}_{args.corruption}.{args.comps.replace(',', '+')}.json"
        if not part.exists():
            from mechcopy import load_model
            from mechcopy.patching import activation_patching
            from mechcopy.tasks import load_task

            model = load_model(args.model)
            res = activation_patching(model, load_task(args.task), args.corruption, n=args.n, shots=args.shots,
                                      seed=args.seed, comps=args.comps.split(","), progress=True).to_json()
            write_json_atomic(part, res)
        parts = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{args.model}_{args.task}_{args.corruption}.*.json"))]
        order = ["resid_pre", "attn_out", "mlp_out", "mixer_out"]
        comps = sorted({c for p in parts for c in p["components"]}, key=order.index)
        if set(comps) != set(order[:3]) and set(comps) != {"resid_pre", "mixer_out"}:
            print(f"have {comps}; waiting for the other components")
            return 0
        merged = dict(parts[0])
        by = {c: v for p in parts for c, v in zip(p["components"], p["values"])}
        merged.update(components=comps, values=[by[c] for c in comps])
        write_json_atomic(path, merged)
    if path.exists():
        res = json.loads(path.read_text())
    else:
        from mechcopy import load_model
        from mechcopy.patching import activation_patching
        from mechcopy.neurons import NeuronSet
        from mechcopy.tasks import list_tasks, load_task

        model = load_model(args.model)
        task = load_task(args.task)
        other = load_task(next(t for t in list_tasks() if t != task.name)) if args.corruption == "other_task" else None
        neurons = NeuronSet.load(args.neurons) if args.neurons else None
        res = activation_patching(model, task, args.corruption, n=args.n, shots=args.shots, seed=args.seed,
                                  other_task=other, neurons=neurons, progress=True).to_json()
        write_json_atomic(path, res)
    fig = heatmap(res, out_dir / f"patching_{args.model}_{args.task}_{args.corruption}.png")
    if fig.stat().st_size < 200_000:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        fig = fig.replace(Path(args.figures) / fig.name)
    print(f"LD clean {res['ld_clean']:.3f}, corrupted {res['ld_corrupt']:.3f}; figure -> {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
