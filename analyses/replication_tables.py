"""Markdown tables for docs/replication.md from the result folders of analyses/replication.py.

    python analyses/replication_tables.py [--root results/replication] \
        [--models smollm2-135m,gemma-3-270m] [--variants default,faithful,classic]

Reads ROOT/MODEL/VARIANT/<stage>.json (each `{"stage", "seconds", "result"}`) as the stage's typed result
(`study_results.STAGE_TYPES`) and prints one table per concern to stdout: probe, attribution cost and completeness, the k sweep, self-consistency, stability,
mean ablation, neuron cards, the k curve on the tasks, held-out effect. The stages finish one by one over hours, so a missing
folder or stage is a "(not run)" cell or note, never an error: the tables can be regenerated at any
point. Nothing is recomputed; the held-out comparisons use `mechcopy.comparisons.comparisons_table`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mechcopy.audit import SelfConsistency
from mechcopy.comparisons import comparisons_table
from mechcopy.stability import spread
from mechcopy.stats import Comparison
from study_results import STAGE_TYPES

NOT_RUN = "(not run)"


# ---------------------------------------------------------------- reading and formatting

def load(root: Path, model: str, variant: str, stage: str):
    """The stage's result as its type (`STAGE_TYPES`), or None when the file is missing (a ValueError or
    KeyError when it is broken)."""
    path = root / model / variant / f"{stage}.json"
    return STAGE_TYPES[stage].from_json(json.loads(path.read_text())["result"]) if path.exists() else None


def num(x, digits: int = 3) -> str:
    """x to `digits` significant digits; '–' for None, 'NaN' for NaN."""
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.{digits}g}"


def with_ci(x, ci) -> str:
    return f"{num(x)} [{num(ci[0])}, {num(ci[1])}]" if ci else num(x)


def counts(d: dict | None) -> str:
    """{'1': 53, '2': 38} -> '1:53 2:38'."""
    return " ".join(f"{k}:{v}" for k, v in (d or {}).items()) or "–"


def values(d: dict | None, digits: int = 3) -> str:
    return " ".join(f"{k}:{num(v, digits)}" for k, v in (d or {}).items()) or "–"


def ranges(layers) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'; None -> 'all (no gate)'."""
    if layers is None:
        return "all (no gate)"
    out, layers = [], sorted(layers)
    for i, l in enumerate(layers):
        if i and l == layers[i - 1] + 1:
            out[-1][1] = l
        else:
            out.append([l, l])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def token(t: str) -> str:
    return repr(t)  # quoted, so leading spaces show; escapes tabs, newlines, no-break spaces


def table(headers: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


DIFF_COLUMNS = [("accuracy", "pruned - unpruned"), ("accuracy", "pruned - random"),
                ("copy_rate", "pruned - unpruned"), ("copy_rate", "pruned - random")]


DIFF_HEAD = ["Δ acc pruned − unpruned", "Δ acc pruned − random", "Δ copy pruned − unpruned", "Δ copy pruned − random"]


def diff_cells(comparisons: list[Comparison]) -> list[str]:
    """The four paired differences of DIFF_COLUMNS from `comparisons.compare_rows` entries, with
    intervals (and, pooled, how many tasks move up/down after Holm)."""
    df = comparisons_table(comparisons)
    holm = "tasks up/down (Holm)"
    cell = {(r["metric"], r["comparison"]): f"{r['diff']} {r['95% CI']}"
            + (f"; tasks up/down {r[holm]}" if holm in df else "") for _, r in df.iterrows()}
    return [cell.get(c, "–") for c in DIFF_COLUMNS]


def section(title: str, source: str, body: str) -> str:
    return f"### {title}\n\nSource: {source}\n\n{body}\n"


def each(args, stage: str, rows_of, width: int) -> list[list]:
    """Rows for every (model, variant): rows_of(result, model, variant) when the stage exists, else one
    '(not run)' row; a broken file or an empty result is one row saying so."""
    rows = []
    for m in args.models:
        for v in args.variants:
            try:
                res = load(args.root, m, v, stage)
                got = NOT_RUN if res is None else [[m, v] + r for r in rows_of(res, m, v)] or "(empty)"
            except (KeyError, TypeError, ValueError, IndexError) as e:
                got = f"(unreadable: {type(e).__name__} {e})"
            rows += [[m, v, got] + [""] * (width - 3)] if isinstance(got, str) else got
    return rows


# ---------------------------------------------------------------- the tables

def probe_table(args) -> str:
    def rows_of(res, *_):
        out = []
        for split, s in (("dev", res.dev), ("test", res.test)):
            rates = s.outcomes
            out.append([split, s.n, with_ci(s.accuracy, s.accuracy_ci), with_ci(s.copy_rate, s.copy_rate_ci),
                        num(rates.get("in_range")), num(rates.get("copy_per_label")),
                        num(rates.get("in_range_per_label")), counts(s.predicted), counts(s.gold_labels)])
        return out

    head = ["model", "variant", "split", "n", "accuracy [95% CI]", "copy rate [95% CI]", "in range",
            "copy per label", "in range per label", "predicted labels", "gold labels"]
    return section("Probe, unpruned", "`probe.json` (dev and test splits of the variant's probe). in range: a wrong "
                   "label of the probe's range that no demo shows; per label: divided by how many labels each "
                   "outcome has (4 demo labels, the rest of the range). Copying shows as copy per label well "
                   "above in range per label",
                   table(head, each(args, "probe", rows_of, len(head))))


def attribution_table(args) -> str:
    def rows_of(res, m, v):
        err = res.completeness_error_median_per_layer
        rest = max(range(1, len(err)), key=lambda i: err[i], default=None)
        sel = load(args.root, m, v, "selection") or load(args.root, m, v, "stability")
        allowed = ranges(sel.allowed_layers) if sel else NOT_RUN
        return [[res.n, num(res.ig_seconds), num(res.gradxact_seconds), num(err[0]) if err else "–",
                 f"{num(err[rest])} (layer {rest})" if rest is not None else "–", allowed]]

    head = ["model", "variant", "prompts", "IG s", "grad×act s", "completeness error, layer 0",
            "max over layers ≥ 1", "layers the gate allows"]
    note = ("`attribution.json` (median over prompts of IG's relative completeness error per layer; IG m = 20, "
            "target contrast), allowed layers from `selection.json`")
    return section("Attribution cost and convergence", note, table(head, each(args, "attribution", rows_of, len(head))))


def selection_table(args) -> str:
    notes = []

    def rows_of(res, m, v):
        sweep = res.sweep
        chosen = res.chosen_k
        out = []
        for r in [sweep.baseline, *sweep.rows]:
            mark = " ← chosen" if r["k"] == chosen else ""
            out.append([f"{r['k']}{mark}", num(r["dev_accuracy"]), num(r["dev_copy_rate"]),
                        f"{100 * r['ppl_increase']:+.3g}%" if r.get("ppl_increase") is not None else "–",
                        {True: "yes", False: "no"}.get(r.get("feasible"), "–")])
        bound = sweep.max_ppl_increase
        notes.append(f"- {m} / {v}: chosen k = {chosen}"
                     + (f" (bound: perplexity +{100 * bound:.3g}%)" if bound is not None else "")
                     + (f"; why: {sweep.why}" if sweep.why else ""))
        return out

    head = ["model", "variant", "k", "dev accuracy", "dev copy rate", "ppl increase", "feasible"]
    rows = each(args, "selection", rows_of, len(head))
    note = "`selection.json` (the k sweep on the dev split; k = 0 is the unpruned baseline)"
    return section("Selection: the k sweep", note, table(head, rows) + ("\n\n" + "\n".join(notes) if notes else ""))


CONSISTENCY_HEAD = ["target unpruned", "chosen − unpruned [95% CI]", "random − unpruned (mean)",
                    "chosen − random [95% CI]", "p", "passes"]


def consistency_rows(source: str, s: SelfConsistency, notes: list[str], where: str) -> list[list]:
    """One row per k of an `audit.self_consistency` result; a line in `notes` on where it passes."""
    passed = [r.k for r in s.rows if r.passed]
    notes.append(f"- {where}, {source} (target {s.target}, {s.n_random} random sets): "
                 + (f"passes at k = {', '.join(map(str, passed))}" if passed else "passes at no k")
                 + f" of {', '.join(str(r.k) for r in s.rows)}")
    out = []
    for r in s.rows:
        vr, vu = r.chosen_vs_random, r.chosen_vs_unpruned
        out.append([source, r.k, s.n_prompts, num(r.unpruned), with_ci(vu.diff, vu.ci), num(r.random - r.unpruned),
                    with_ci(vr.diff, vr.ci), num(vr.p_value, 2), "**yes**" if r.passed else "no"])
    return out


def consistency_table(args) -> str:
    notes: list[str] = []

    def rows_of(res, m, v):
        return [row for source, s in res.checks.items() for row in consistency_rows(source, s, notes, f"{m} / {v}")]

    head = ["model", "variant", "scores", "k", "prompts", *CONSISTENCY_HEAD]
    note = ("`consistency.json`: the attribution target (contrast = logit of the likeliest demo label minus the "
            "gold logit; mean over the attribution prompts) with the top-k set pruned vs layer-matched random "
            "sets, paired over prompts and random sets. Passes when the chosen − random interval lies wholly "
            "on the less-copying side (below 0 for contrast and copy_prob, above 0 for gold_logprob).")
    rows = each(args, "consistency", rows_of, len(head))
    return section("Self-consistency: does pruning the chosen set move the target more than random sets?",
                   note, table(head, rows) + ("\n\n" + "\n".join(notes) if notes else ""))


ABLATIONS = ("zero", "mean", "zero, last position", "mean, last position")


def ablation_table(args) -> str:
    notes: list[str] = []

    def rows_of(res, m, v):
        return [row for name in ABLATIONS if name in res.checks for row in
                consistency_rows(f"ig (variant), {name}", res.checks[name], notes, f"{m} / {v}")]

    head = ["model", "variant", "ablation", "k", "prompts", *CONSISTENCY_HEAD]
    note = ("`ablation.json`: the self-consistency check of the variant's IG scores with every set (chosen and "
            "random) zeroed, as pruning does, and set to its mean activation over the dev split's prompts (mean "
            "ablation), each at every position and at the last position only (there with the last position's "
            "mean), along the k curve and at the dev split's chosen k. A set that only carries a large constant "
            "moves the target when zeroed and not when mean-ablated.")
    rows = each(args, "ablation", rows_of, len(head))
    return section("Mean ablation beside zeroing", note, table(head, rows) + ("\n\n" + "\n".join(notes) if notes else ""))


def methods_table(args) -> str:
    def rows_of(res, m, v):
        out = []
        for name in res.methods:
            out.append([name, res.k, res.n_per_task, *diff_cells(res.pooled[name])])
        return out

    head = ["model", "variant", "attribution", "k", "prompts per task", *DIFF_HEAD]
    note = ("`evaluate-methods.json`: every held-out task (standard construction) unpruned and, at one k (the dev "
            "split's choice, else the smallest k that beats no pruning without the bound), each attribution's top-k "
            "set and one random set matched to its layers; pooled paired differences with 95% intervals")
    return section("Held-out effect by attribution", note, table(head, each(args, "evaluate-methods", rows_of, len(head))))


def kcurve_table(args) -> str:
    figures = []

    def rows_of(res, m, v):
        rates: dict = {}                           # (family, group) -> [(accuracy, copy rate) per task]
        for r in res.rows:
            rates.setdefault((r.spec.family, r.spec.group), []).append((r.result.accuracy, r.result.copy_rate))
        png = args.root / m / v / "kcurve-tasks.png"
        if png.exists():
            figures.append(f"- {m} / {v}: `{png}`")
        out = []
        for k in res.ks:
            acc, copy = (sum(x) / len(x) for x in zip(*rates[("pruned", k)]))
            out.append([f"**{k}**" if k == res.chosen_k else k, len(rates[("pruned", k)]), res.n_per_task,
                        f"{num(acc, 2)} / {num(copy, 2)}", *diff_cells(res.pooled[k])])
        base = [sum(x) / len(x) for x in zip(*rates[("unpruned", None)])]
        return [[f"0 (unpruned){' **chosen**' if res.chosen_k == 0 else ''}", len(rates[("unpruned", None)]),
                 res.n_per_task, f"{num(base[0], 2)} / {num(base[1], 2)}", "", "", "", ""]] + out

    head = ["model", "variant", "k", "tasks", "prompts per task", "acc / copy (mean over tasks)",
            *DIFF_HEAD]
    note = ("`kcurve-tasks.json`: every held-out task (standard construction) unpruned and, for every k of the dev "
            "sweep, the top-k set and one layer-matched random set; pooled paired differences (tasks weighed "
            "equally) with 95% intervals. The dev split's choice is in bold; the choice is made on the probe's dev "
            "split only, the curve is shown beside it.")
    rows = each(args, "kcurve-tasks", rows_of, len(head))
    return section("The k curve on the tasks", note, table(head, rows) + ("\n\nFigures:\n" + "\n".join(figures) if figures else ""))


def stability_table(args) -> str:
    ks: list[str] = []

    def rows_of(res, *_):
        full, settings = res.bootstrap_and_normalisations, res.ig_settings
        ks[:] = ks or list(full.ks or settings.ks)

        def span(values):
            d = spread(values)
            return f"{num(d['mean'], 2)} [{num(d['q05'], 2)}, {num(d['q95'], 2)}]"

        out = [[f"bootstrap, {b.normalisation}", f"{b.n_prompts} × {b.n_boot}", span(b.spearman)]
               + [span(b.jaccard[k]) for k in ks] for b in full.bootstrap]
        out += [[f"normalisation {a.a} vs {a.b}", "", num(a.spearman, 2)] + [num(a.jaccard[k], 2) for k in ks]
                for a in full.normalisations]
        out += [[f"setting {a.a} vs {a.b}", "", num(a.spearman, 2)] + [num(a.jaccard[k], 2) for k in ks]
                for a in settings.settings if a.a == settings.reference]
        for name, m in res.methods.items():
            b = m.bootstrap
            out.append([f"bootstrap, {name} ({b.normalisation}; layers {ranges(m.allowed_layers)})",
                        f"{b.n_prompts} × {b.n_boot}", span(b.spearman)] + [span(b.jaccard[k]) for k in ks])
            out.append([f"selection {name} vs ig (variant), all prompts", "", ""]
                       + [num(m.jaccard_with_variant.get(k), 2) for k in ks])
        return out

    rows = each(args, "stability", rows_of, 5)
    ks = ks or [5, 30, 100]  # the stage's ks, when no stability.json says
    head = ["model", "variant", "comparison", "prompts × resamples", "Spearman"] + [f"Jaccard top-{k}" for k in ks]
    rows = [r + [""] * (len(head) - len(r)) for r in rows]
    note = ("`stability.json`: bootstrap = mean [5%, 95%] over resamples of the attribution prompts against the full "
            "set, per normalisation; normalisations compared on the full set; IG settings (steps, targets, "
            "grad×act) on the first prompts, each against the reference (min-max scores; other pairs in the JSON). "
            "Layers: the gate's, where the variant gates. Per attribution compared (ig as the variant selects, ig "
            "with the other gate setting, grad×act): its bootstrap on all prompts with its own layers, and the "
            "overlap of its top-k set with the variant's.")
    return section("Stability of the selection", note, table(head, rows))


def cards_table(args) -> str:
    figures = []

    def rows_of(res, m, v):
        png = args.root / m / v / "cards.png"
        if png.exists():
            figures.append(f"- {m} / {v}: `{png}`")
        out = []
        for c in res.cards:
            changed = sum(a != b for a, b in zip(c.predicted, c.predicted_pruned))
            out.append([f"{c.layer}.{c.index}", num(c.score), " ".join(token(t) for t, _ in c.promoted[:4]),
                        " ".join(token(t) for t, _ in c.suppressed[:4]), values(c.label_logits, 2),
                        values(c.activation_by_gold()), values(c.activation_by_copied()),
                        f"{counts(c.label_counts())} → {counts(c.label_counts(pruned=True))} "
                        f"({changed}/{len(c.predicted)} changed)"])
        return out

    head = ["model", "variant", "neuron (layer.index)", "score", "promotes", "suppresses", "logit on labels",
            "activation by gold label", "activation by copied label", "dev predictions: unpruned → this one pruned"]
    rows = each(args, "cards", rows_of, len(head))
    note = "`cards.json` (the top neurons by the variant's scores, on the dev split)"
    body = table(head, rows) + ("\n\nFigures:\n" + "\n".join(figures) if figures else "")
    return section("Neuron cards", note, body)


def heldout_table(args, construction: str) -> str:
    stage = f"evaluate-{construction}"
    parts, missing = [], []
    for m in args.models:
        for v in args.variants:
            partial = args.root / m / v / f"{stage}.partial.jsonl"
            try:
                res = load(args.root, m, v, stage)
                if res is not None:
                    parts.append(heldout_one(m, v, res))
                elif partial.exists():
                    parts.append(f"{m} / {v}: {NOT_RUN} (in progress: {len(partial.read_text().splitlines())} "
                                 "rows checkpointed)")
                else:
                    missing.append(f"{m} / {v}")
            except (KeyError, TypeError, ValueError, IndexError) as e:
                parts.append(f"{m} / {v}: (unreadable: {type(e).__name__} {e})")
    note = (f"`{stage}.json` (`comparisons`, from `comparisons.compare_rows`): paired differences with 95% intervals; "
            "random = the layer-matched random sets as one family; pooled (held-out tasks weighed equally) adds "
            "how many tasks move significantly up/down after Holm")
    gold = "gold among the demos as usual" if construction == "standard" else "gold never among the demos"
    if missing:
        parts.append(f"{NOT_RUN}: {', '.join(missing)}")
    return section(f"Held-out effect, {construction} construction ({gold})", note, "\n\n".join(parts))


def heldout_one(model: str, variant: str, res) -> str:
    unpruned = {r.task: r.result for r in res.rows if r.condition == "unpruned"}
    head = ["task", "n", "unpruned acc / copy", *DIFF_HEAD]
    why = ((res.chosen_k, "the dev split's choice"), (res.unbounded_k, "preferred without the bound"),
           (res.smallest_better_k, "smallest k beating no pruning without the bound"))
    out = []
    for k, comps in res.comparisons.items():
        reasons = [w for key, w in why if key == k]
        rows = []
        for task, cs in comps.items():
            u = unpruned.get(task)
            rows.append([f"**{task}**" if task == "pooled" else task, cs[0].n if cs else "–",
                         f"{num(u.accuracy, 2)} / {num(u.copy_rate, 2)}" if u else "", *diff_cells(cs)])
        dropped = {t: d for t, d in res.dropped.items() if d}
        title = (f"{model} / {variant}, k = {k}" + (f" ({'; '.join(reasons)})" if reasons else "")
                 + (f"; prompts dropped: {counts(dropped)}" if dropped else ""))
        out.append(f"{title}\n\n{table(head, rows)}")
    if not out:
        return f"{model} / {variant}: no k in the grid ({list(res.grid)})"
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("results/replication"))
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--variants", default="default,faithful,classic")
    args = ap.parse_args()
    args.models, args.variants = args.models.split(","), args.variants.split(",")
    for make in (probe_table, attribution_table, selection_table, consistency_table, ablation_table, stability_table,
                 cards_table, kcurve_table, methods_table):
        print(make(args))
    for construction in ("standard", "nogold"):
        print(heldout_table(args, construction))


if __name__ == "__main__":
    main()
