"""The organisms: does exhaustive single-head ablation find the study's attribution heads? (issue 26)

    python analyses/organism_heads.py /work/organisms/transformer-s{0,1,2,3,4} \
        --out docs/data/copy_mechanism_organisms.json --threads 1

The plan, fixed before this ran: docs/copy_mechanism.md, "Second session ...", "The organisms". For
each transformer organism (2 layers x 4 heads), on its shift probe `probe-shift` (the attribution,
dev and test splits of `organisms.data.probe_splits`, the sizes the organisms' method uses):

- **ground truth** (`single_head_ablations`): each of the 8 heads alone mean-ablated (its `z` set to
  its mean over every position of the attribution split, at every position: `pruning.component_means`,
  a `conditions.Condition` per head); on the test split the mean change of the contrast target
  T = logit(X) - logit(gold) at the last position, X the demo label the *unablated* run prefers (the
  target the attribution explains, `attribution.make_target("contrast")`), and the copy rate and
  accuracy (`evaluation.evaluate_conditions`).
- **attribution** (`attribute_heads`): the study's head attribution, `head_attributions` of
  analyses/copy_mechanism.py (IG over heads, 20 steps, from each prompt's label-swap counterfactual,
  target T at the last position) scored by `method.score` (min-max per prompt, IG's completeness gate),
  on the attribution split; from a zero baseline only when no prompt has a swap. A shift prompt's
  swap replaces the demos carrying X by a demo of the *same shift* carrying an absent letter Z (each
  prompt's task is its shift function, `by_function`, so the swap's candidate demos are that
  function's pairs shown in the split), so the counterfactual is an episode of the same rule.
- **answer** (`compare`): yes when the head whose ablation lowers T the most is the attribution's top
  head; both rankings of all 8 heads and their Spearman correlation (`attribution.rank_correlation`).
  Organisms whose unablated test copy rate is below 0.15 are reported, not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

#: the organisms' own split sizes (`organisms.method`: ORGANISM_FIND n, n_dev; MethodConfig n_eval), probe seed 0
SETTINGS: dict[str, Any] = {"probe": "probe-shift", "n_attr": 100, "n_dev": 200, "n_test": 400, "shots": 4, "seed": 0,
                            "steps": 20, "min_copy_rate": 0.15, "ablation": "mean", "positions": "all"}
#: docs/organisms_tables.md's per-seed figures of the organisms trained in the first session (probe-shift,
#: unpruned): test accuracy (400 prompts), dev accuracy and dev copy rate (200 prompts); the retrained
#: organisms are compared with them (`reproduction`)
DOCUMENTED = {"test_accuracy": [0.10, 0.04, 0.03, 0.07, 0.06], "dev_accuracy": [0.10, 0.04, 0.03, 0.12, 0.07],
              "dev_copy_rate": [0.05, 0.57, 0.74, 0.06, 0.47]}


def study():
    """analyses/copy_mechanism.py as a module (the study's `head_attributions`; analyses/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("copy_mechanism", Path(__file__).with_name("copy_mechanism.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_name(head: Sequence[int]) -> str:
    return f"L{head[0]}H{head[1]}"


def by_function(prompts: Sequence) -> list:
    """Shift-probe prompts with their shift function as task (`organism-shift-S`) and the 26 letters as
    label space: what `tasks.pairs.label_swaps` needs to swap a demo label for an absent letter within
    the same function."""
    from mechcopy.organisms.data import LETTERS

    out = []
    for p in prompts:
        shifts = {(LETTERS.index(y) - LETTERS.index(x)) % 26 for x, y in p.demos}
        if len(shifts) != 1:
            raise ValueError(f"prompt {p.text!r} is not a shift episode (demo shifts {sorted(shifts)})")
        out.append(replace(p, task=f"organism-shift-{shifts.pop()}", label_space=tuple(LETTERS)))
    return out


def contrast(model, prompts: Sequence, hooks=(), copies: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """T = logit(X) - logit(gold) at the last position of each prompt under `hooks`, and the X used:
    `copies` (first-token ids), or the demo label the run itself prefers (`make_target("contrast")`)."""
    from mechcopy.attribution import make_target

    tokens = [model.to_tokens(p.text)[0] for p in prompts]
    if len({len(t) for t in tokens}) != 1:
        raise ValueError("contrast() batches prompts of one token length (the organisms' shift probe has one)")
    with torch.no_grad():
        logits = model.run_with_hooks(torch.stack(tokens), fwd_hooks=list(hooks))[:, -1].float()
    if copies is None:
        copies = [int(make_target("contrast", p, row).copy) for p, row in zip(prompts, logits)]  # type: ignore[arg-type]
    gold = [int(p.answer_ids[0]) for p in prompts]
    rows = torch.arange(len(prompts))
    return logits[rows, list(copies)] - logits[rows, gold], list(copies)


def single_head_ablations(model, attribution: Sequence, test: Sequence, settings: dict = SETTINGS) -> dict[str, Any]:
    """Each head alone mean-ablated (means over every position of `attribution`, at every position): on
    `test`, the mean change of T (X fixed by the unablated run), accuracy and copy rate; the unablated row."""
    from mechcopy.conditions import UNPRUNED, Condition
    from mechcopy.evaluation import evaluate_conditions
    from mechcopy.heads import all_heads, head_set
    from mechcopy.pruning import component_means, condition_hooks

    means = component_means(model, attribution, "head", settings["positions"], reference="probe-shift attribution split")
    conditions = [UNPRUNED] + [Condition(head_name(h), "pruned", head_set(model, [h]), settings["ablation"],
                                         settings["positions"], means) for h in all_heads(model)]
    results = evaluate_conditions(model, test, conditions, seed=settings["seed"])
    t0, copies = contrast(model, test)
    rows = {}
    for cond in conditions:
        delta = contrast(model, test, condition_hooks(model, cond), copies)[0] - t0
        r = results[cond.label]
        rows[cond.label] = {"delta_T": float(delta.mean()), "delta_T_se": float(delta.std() / len(delta) ** 0.5),
                            "share_lowered": float((delta < 0).float().mean()), "accuracy": r.accuracy,
                            "copy_rate": r.copy_rate}
    unablated = rows.pop("unpruned")
    return {"unablated": {"T": float(t0.mean()), "accuracy": unablated["accuracy"], "copy_rate": unablated["copy_rate"],
                          "n": len(test)}, "heads": rows}


def attribute_heads(model, attribution: Sequence, settings: dict = SETTINGS) -> dict[str, Any]:
    """The study's head attribution on `attribution` (label-swap counterfactual; zero where no prompt has a
    swap), scored as the study scores it: per head its score, whether its layer passed IG's gate, the mean IG."""
    from mechcopy.head_attribution import head_integrated_gradients
    from mechcopy.heads import all_heads

    driver = study()
    prompts = by_function(attribution)
    try:
        ig, clean, dropped = driver.head_attributions(model, prompts, settings["seed"], settings)
        baseline = "label-swap counterfactual"
    except ValueError as e:   # no prompt has a label swap
        ig, clean, dropped = head_integrated_gradients(model, prompts, steps=settings["steps"]), prompts, [str(e)]
        baseline = "zero"
    scores = driver.score_heads(model, ig, clean, settings["seed"], settings)
    eligible, mean_ig = scores.eligible(), ig.values.mean(0)
    return {"baseline": baseline, "n_prompts": len(clean), "n_dropped": len(dropped), "dropped": dropped[:5],
            "completeness_error_by_layer": ig.completeness_error().median(0).values.tolist(),
            "allowed_layers": None if scores.allowed_layers is None else list(scores.allowed_layers),
            "heads": {head_name(h): {"score": float(scores.scores[h]), "eligible": bool(eligible[h]),
                                     "mean_ig": float(mean_ig[h])} for h in all_heads(model)}}


def compare(ablation: dict[str, dict], attribution: dict[str, dict], copy_rate: float,
            min_copy_rate: float = SETTINGS["min_copy_rate"]) -> dict[str, Any]:
    """Both rankings of the heads (ground truth: the largest fall of T first; attribution: eligible heads by
    score, then the others), their Spearman correlation, and the answer: does the head whose ablation
    lowers T the most top the attribution? Counted only when the organism copies (`copy_rate`)."""
    from mechcopy.attribution import rank_correlation

    names = list(ablation)
    truth = sorted(names, key=lambda n: ablation[n]["delta_T"])
    attr = sorted(names, key=lambda n: (not attribution[n]["eligible"], -attribution[n]["score"]))
    rho = rank_correlation(torch.tensor([-ablation[n]["delta_T"] for n in names], dtype=torch.float64),
                           torch.tensor([attribution[n]["score"] for n in names], dtype=torch.float64))
    return {"ground_truth_ranking": truth, "attribution_ranking": attr, "spearman": rho,
            "top_ground_truth": truth[0], "top_attribution": attr[0], "answer": "yes" if truth[0] == attr[0] else "no",
            "counted": copy_rate >= min_copy_rate, "delta_T_top_ground_truth": ablation[truth[0]]["delta_T"],
            "delta_T_top_attribution": ablation[attr[0]]["delta_T"]}


def run_organism(folder: Path, settings: dict = SETTINGS) -> dict[str, Any]:
    """Every figure of one organism (see the module docstring), with the reproduction check's figures."""
    from mechcopy.evaluation import evaluate
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.io import read_json
    from mechcopy.organisms import load_organism, probe_splits

    t0 = time.perf_counter()
    model = load_organism(folder)
    s = settings
    attribution, dev, test = probe_splits(model.tokenizer, s["n_attr"], s["n_dev"], s["n_test"], s["shots"], s["seed"],
                                          probe=s["probe"])
    ablation = single_head_ablations(model, attribution, test, s)
    attr = attribute_heads(model, attribution, s)
    dev_result = evaluate(model, dev, seed=s["seed"])
    meta = read_json(folder / "organism.json")
    return {"organism": folder.name, "seed": meta["seed"], "model": model_fingerprint(model),
            "training": {k: (meta.get("result") or {}).get(k) for k in ("seconds", "steps_done", "final_loss", "final_accuracy")},
            "dev": {"accuracy": dev_result.accuracy, "copy_rate": dev_result.copy_rate, "n": dev_result.n},
            **ablation, "attribution": attr,
            **compare(ablation["heads"], attr["heads"], ablation["unablated"]["copy_rate"], s["min_copy_rate"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def reproduction(results: Sequence[dict]) -> dict[str, Any]:
    """The retrained organisms' probe-shift figures beside docs/organisms_tables.md's, at its precision (2 decimals)."""
    rows = []
    for r in results:
        ours = {"test_accuracy": r["unablated"]["accuracy"], "dev_accuracy": r["dev"]["accuracy"],
                "dev_copy_rate": r["dev"]["copy_rate"]}
        documented = {k: v[r["seed"]] for k, v in DOCUMENTED.items()}
        rows.append({"organism": r["organism"], "seed": r["seed"], "ours": ours, "documented": documented,
                     "same_at_2_decimals": all(abs(ours[k] - documented[k]) <= 0.005 + 1e-9 for k in ours)})
    return {"what": "probe-shift, unablated: test accuracy (400 prompts), dev accuracy and copy rate (200), against "
                    "docs/organisms_tables.md (the first session's organisms)", "rows": rows,
            "all_same": all(r["same_at_2_decimals"] for r in rows)}


def summarise(results: Sequence[dict], settings: dict = SETTINGS) -> dict[str, Any]:
    """The pooled answer: how many copying organisms answer yes."""
    counted = [r for r in results if r["counted"]]
    return {"organisms": len(results), "copying": len(counted), "yes": sum(r["answer"] == "yes" for r in counted),
            "copying_organisms": [r["organism"] for r in counted],
            "what": f"organisms with an unablated test copy rate of at least {settings['min_copy_rate']} counted"}


def main(argv=None) -> int:
    from mechcopy.commands.common import at_least

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("organisms", nargs="+", type=Path, help="organism folders (mechcopy train-organism --arch transformer)")
    ap.add_argument("--out", type=Path, default=Path("docs/data/copy_mechanism_organisms.json"))
    ap.add_argument("--threads", type=at_least(1), default=1)
    args = ap.parse_args(argv)
    from mechcopy.io import write_json_atomic
    from mechcopy.provenance import git_revision

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    for folder in args.organisms:
        results.append(run_organism(folder))
        r = results[-1]
        print(f"{r['organism']}: copy rate {r['unablated']['copy_rate']:.2f}, truth {r['top_ground_truth']}, "
              f"attribution {r['top_attribution']} ({r['attribution']['baseline']}, {r['attribution']['n_dropped']} "
              f"dropped), rho {r['spearman']:+.2f}: {r['answer']}; {r['seconds']} s", file=sys.stderr)
    doc = {"what": "the organisms' exhaustive single-head ablation against the study's head attribution "
                   "(docs/copy_mechanism.md, 'Organisms: does exhaustive head ablation find the attribution's heads?')",
           "command": "python analyses/organism_heads.py " + " ".join(map(str, args.organisms))
                      + f" --out {args.out} --threads {args.threads}",
           "git_revision": git_revision(), "settings": SETTINGS, "organisms": results,
           "pooled": summarise(results), "reproduction": reproduction(results),
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(args.out, doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
