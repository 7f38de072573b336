"""Layer x head maps on a zoo model: direct logit attribution, IG over heads, label attention and the OV
check, per-head patching; for the copy probe and for a label task with no gold among the demos.

    python analyses/heads.py --model smollm2-135m --task probe --n 16
    python analyses/heads.py --model gemma-3-270m --task sentiment_binary --n 16

Prompts: the balanced probe's attribution split (`build_probe`, gold never a demo label), or the task's
prompts built with `gold_in_demos=False`, 4 shots, seed 0. Every map reads the same prompts. The target
is logit(c) - logit(gold), c the demo label with the highest clean logit (the label the model would
copy). The counterfactual prompt (`copied_to_gold`) is the same prompt with c replaced by the gold in
every demo that shows it: the copied label is gone from the demos and the gold is there instead.

* `dla`: direct logit attribution of the target (`head_attribution.direct_logit_attribution`), mean
  over the prompts;
* `ig`: IG over heads (m = 20, fast path) of the target, from the heads' last-position output on the
  counterfactual prompt to their output on the prompt, completeness per layer recorded;
* `label`: attention from the final position to the demo-label tokens, and the OV margin (the attended
  label's logit minus the mean of the other labels in play, the other demo labels and the gold, in what
  the head writes from the attended label per unit attention), over
  copy errors, correct answers and all prompts (first-token outcomes);
* `patch`: per-head patching of `z` at all positions from the counterfactual run into the prompt's run
  (`role_pairs_of(..., reverse=True)`), read as the change of logit(gold) - logit(c) in logits (mean
  over pairs) and normalised by the gap, with `gap_warning`: which heads, given the output they have
  when the demos show gold instead of c, move the model from c to the gold.

Each stage's JSON goes to `--out-dir` (ignored `results/heads/`) and is reused when it exists, so an
interrupted run resumes; the merged small JSON goes to `docs/data/heads_<model>_<task>.json` and one
PNG of the four maps to `docs/figures/heads_<model>_<task>.png`, and a circuitsvis view of the top heads
on a copy error (about 1.3 MB, offline) to `--out-dir`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGES = ("dla", "ig", "label", "patch")


def _r(x, nd: int = 4):
    """Nested lists rounded (small JSON); NaN -> None."""
    import math

    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else round(float(x), nd)


def _top(values, k: int = 5) -> list[dict]:
    import numpy as np

    a = np.nan_to_num(np.asarray(values, float), nan=0.0)
    order = np.argsort(-np.abs(a).ravel(), kind="stable")[:k]
    return [{"layer": int(i // a.shape[1]), "head": int(i % a.shape[1]), "value": round(float(a.ravel()[i]), 4)}
            for i in order]


def prompts_for(model, task: str, n: int):
    from mechcopy.tasks import load_task
    from mechcopy.tasks.probe import ProbeConfig, build_probe
    from mechcopy.tasks.prompts import build_prompts

    if task == "probe":
        return list(build_probe(model.tokenizer, ProbeConfig(), n_attr=n, n_dev=0, n_test=0, seed=0).attribution)
    return list(build_prompts(load_task(task), model.tokenizer, shots=4, n=n, seed=0, gold_in_demos=False).prompts)


def copied_to_gold(model, prompts) -> list:
    """Each prompt with its copied label replaced by the gold (`head_attribution.copied_to_gold`)."""
    from mechcopy.head_attribution import copied_to_gold as counterfactuals

    return counterfactuals(model, prompts)


def run_stage(stage: str, model, prompts) -> dict:
    from mechcopy.head_attribution import direct_logit_attribution, head_integrated_gradients
    from mechcopy.head_patching import head_patching
    from mechcopy.label_attention import label_attention
    from mechcopy.patching import role_pairs_of

    t0 = time.time()
    if stage == "dla":
        d = direct_logit_attribution(model, prompts, progress=True)
        out = {"mean": _r(d.heads.mean(0).tolist()), "max_abs_error": float((d.total() - d.logit_diff).abs().max()),
               "logit_diff": _r(d.logit_diff.tolist()), "mlp_mean": _r(d.mlp.mean(0).tolist()),
               "attn_bias_mean": _r(d.attn_bias.mean(0).tolist()), "embed_mean": float(d.embed.mean()),
               "heads_sum_mean": float(d.heads.sum((1, 2)).mean()), "mlp_sum_mean": float(d.mlp.sum(1).mean())}
    elif stage == "ig":
        a = head_integrated_gradients(model, prompts, steps=20, baseline=copied_to_gold(model, prompts), progress=True)
        err = a.completeness_error()
        zero = head_integrated_gradients(model, prompts[:4], steps=20)      # the zero baseline, for its completeness
        out = {"mean": _r(a.values.mean(0).tolist()), "steps": 20, "method": a.method, "baseline": a.baseline,
               "zero_baseline_completeness_error_median_by_layer": _r(zero.completeness_error().median(0).values.tolist()),
               "zero_baseline_n_prompts": len(zero.values),
               "completeness_error_median_by_layer": _r(err.median(0).values.tolist()),
               "completeness_abs_error_max": float((a.sums - a.deltas).abs().max()),
               "delta_mean_by_layer": _r(a.deltas.mean(0).tolist()), "target_clean": _r(a.target_clean.tolist())}
    elif stage == "label":
        la = label_attention(model, prompts)
        out = {"outcomes": list(la.outcomes), "label_share_mean": float(la.label_share.mean())}
        for outcome in ("copy", "correct", None):
            key = outcome or "all"
            out[f"to_labels_{key}"] = _r(la.mean("to_labels", outcome).tolist())
            out[f"ov_margin_{key}"] = _r(la.mean("ov_margin", outcome).tolist())
        out["to_bos_all"] = _r(la.mean("to_bos").tolist())
        out["attended_is_copied_share"] = _attended_is_copied(la, prompts)
    else:
        import torch

        pairs = role_pairs_of(model, prompts, copied_to_gold(model, prompts), reverse=True)
        res = head_patching(model, pairs, "z", task="", corruption="copied_to_gold (reversed)")
        change = torch.tensor(res.pair_values)[:, :, 0].mean(0) - sum(res.ld_corrupt) / len(res.ld_corrupt)
        out = {"mean": _r(change.tolist()), "normalised": _r(res.array()[:, 0].tolist()), "gap": res.gap,
               "warning": res.warning, "n_pairs": res.n_pairs, "n_dropped": res.n_dropped, "dropped": list(pairs.dropped),
               "ld_clean": _r(list(res.ld_clean)), "ld_corrupt": _r(list(res.ld_corrupt)),
               "same_layout_pairs": sum(p.same_layout for p in pairs),
               "read_as": "mean over pairs of LD_patched - LD_unpatched, LD = logit(gold) - logit(c), in logits"}
    out["seconds"] = round(time.time() - t0, 1)
    out["n_prompts"] = len(prompts)
    return out


def _attended_is_copied(la, prompts) -> list | None:
    """Per head, over copy errors: the share where the demo the head attends to most carries the label the
    model copied (first token)."""
    import torch

    rows = la.where("copy")
    if not len(rows):
        return None
    hits = []
    for i in rows:
        ids = torch.tensor([ids[0] for ids in prompts[i].demo_label_ids])
        hits.append((ids[la.attended[i]] == la.predicted[i]).float())
    return _r(torch.stack(hits).mean(0).tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="probe", help="probe, or a built-in label task (no gold among the demos)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out-dir", default="results/heads")
    ap.add_argument("--data", default="docs/data")
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from mechcopy import load_model, viz
    from mechcopy.io import write_json_atomic
    from mechcopy.fingerprint import model_fingerprint

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name                    # a zoo name, or a model folder's name
    stem = f"heads_{name}_{args.task}"
    t0 = time.time()
    model = load_model(args.model)
    load_s = time.time() - t0
    prompts = prompts_for(model, args.task, args.n)
    results = {}
    for stage in args.stages.split(","):
        path = out_dir / f"{stem}.{stage}.json"
        if path.exists():
            results[stage] = json.loads(path.read_text())
            continue
        print(f"{stem}: {stage} on {len(prompts)} prompts", flush=True)
        results[stage] = run_stage(stage, model, prompts)
        write_json_atomic(path, results[stage])
        print(f"  {results[stage]['seconds']} s", flush=True)
    if not all(s in results for s in STAGES):
        return 0
    lab = results["label"]
    summary = {
        "model": model_fingerprint(model), "task": args.task, "n_prompts": len(prompts), "shots": 4, "seed": 0,
        "command": f"python analyses/heads.py --model {args.model} --task {args.task} --n {args.n}",
        "load_seconds": round(load_s, 1), "threads": args.threads,
        "outcomes": {o: lab["outcomes"].count(o) for o in ("correct", "copy", "other")},
        **{stage: results[stage] for stage in STAGES},
        "top": {"dla": _top(results["dla"]["mean"]), "ig": _top(results["ig"]["mean"]),
                "patch": _top(results["patch"]["mean"]), "to_labels_copy": _top(lab["to_labels_copy"]),
                "ov_margin_copy": _top(lab["ov_margin_copy"])},
    }
    summary["dla"] = {k: v for k, v in summary["dla"].items() if k != "per_prompt_heads"}
    write_json_atomic(Path(args.data) / f"{stem}.json", summary)
    panels = {
        "DLA: logit(copied) - logit(gold)": {"values": results["dla"]["mean"], "label": "logit"},
        "IG from the copied-to-gold run": {"values": results["ig"]["mean"], "label": "logit"},
        "attention to demo labels (copy errors)": {"values": lab["to_labels_copy"] if lab["outcomes"].count("copy")
                                                   else lab["to_labels_all"], "label": "attention", "centre": False},
        "OV margin of the attended label": {"values": lab["ov_margin_all"], "label": "logit / attention"},
        "patching z (copied-to-gold -> prompt)": {"values": results["patch"]["mean"],
                                                   "label": "change of logit(gold) - logit(c)"},
    }
    import numpy as np

    panels = {k: {**p, "values": np.array([[np.nan if v is None else v for v in row] for row in p["values"]])}
              for k, p in panels.items()}
    fig = viz.plot_head_maps(panels, f"{name}, {args.task} (no gold among the demos), n = {len(prompts)}")
    viz.save_figure(fig, Path(args.figures) / f"{stem}.png", dpi=80)
    copies = [i for i, o in enumerate(lab["outcomes"]) if o == "copy"]
    if copies:
        tops = [(t["layer"], t["head"]) for t in summary["top"]["dla"][:3] + summary["top"]["to_labels_copy"][:3]]
        viz.head_attention_view(model, prompts[copies[0]], list(dict.fromkeys(tops))).save(out_dir / f"{stem}_view.html")
    print(f"-> {Path(args.data) / f'{stem}.json'}, {Path(args.figures) / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
