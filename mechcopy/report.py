"""The main job's report: `build_report(out_dir)` turns a `mechcopy reproduce` output folder into one
standalone, offline HTML file; `render_report`/`write_report` assemble any sections.

The report is a view of the folder: it reads the stages' JSON as the result types that wrote them
(`mechcopy.job.Run`) and never loads or runs a model; what it shows of the model up close (attention,
neuron activations) was saved by the `views` stage (`mechcopy.views`).

Everything is inside the file: figures as base64 `data:` URIs, circuitsvis' script once in the
head (each view then only calls `CircuitsVis.render`), tables as HTML. A Content-Security-Policy
forbids the page every network request, so it opens the same on an air-gapped machine and
cannot leak anything when opened on a connected one.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mechcopy import viz
from mechcopy.comparisons import Evaluation
from mechcopy.components import Components
from mechcopy.io import write_atomic
from mechcopy.job import Run, Settings
from mechcopy.method import Choice
from mechcopy.patching import PatchingResult
from mechcopy.stats import Comparison, TaskLevel
from mechcopy.task_vectors import TaskVectorResult
from mechcopy.views import Views, marked_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Inline scripts and styles, data: images; nothing from anywhere else (no fetch, no fonts, no frames).
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fff; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 3em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav ol { columns: 2; font-size: 0.95em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #666; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.data th { background: #f4f4f4; }
.view { border: 1px solid #eee; padding: 0.3em 0.8em; margin: 1em 0; overflow-x: auto; }
footer { margin-top: 3em; border-top: 1px solid #ddd; font-size: 0.85em; color: #444; }
footer table td { vertical-align: top; padding: 0.15em 0.8em 0.15em 0; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; margin: 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class Section:
    """One section of the report.

    `text`: plain paragraphs separated by blank lines; lines starting with "- " form a list;
    `code` and **bold** are honoured. `figures`: PNG paths. `html`: raw HTML snippets, e.g. a
    `mechcopy.viz.CircuitsvisHTML` (or its `local_src`; the inlined circuitsvis script is then
    shared, not repeated). `table`: a DataFrame shown as an HTML table.
    """

    title: str
    text: str = ""
    figures: Sequence[str | Path] = field(default_factory=list)
    html: Sequence[Any] = field(default_factory=list)
    table: pd.DataFrame | None = field(default=None, compare=False)


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def text_to_html(text: str) -> str:
    """Blank-line separated paragraphs; "- " lines become a list. Everything is escaped."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines))}</p>")
    return "\n".join(out)


def png_data_uri(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report figure {path} does not exist; save it first (mechcopy.viz.save_figure)")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"report figure {path} is not a PNG file; the report embeds PNGs only")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _library_variants() -> list[str]:
    """circuitsvis' script as our views and as circuitsvis' own `local_src` inline it."""
    import circuitsvis  # heavy, and needed only where a page holds a view

    raw = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
    return [raw.replace("</script>", ""), viz.circuitsvis_library()]


def html_item(item: Any) -> tuple[str, bool]:
    """(HTML for one `Section.html` entry, whether it needs circuitsvis' script on the page)."""
    if isinstance(item, viz.CircuitsvisHTML):
        return item.snippet(include_library=False), True
    if not isinstance(item, str):
        item = getattr(item, "local_src", None) or item._repr_html_()
    needs_library = False
    if "CircuitsVis.render(" in item:
        # circuitsvis writes `<div id=.../>`, which HTML parses as an unclosed div.
        item = re.sub(r'(<div id="circuits-vis-[^"]*"[^>]*?)\s*/>', r"\1></div>", item)
        for lib in _library_variants():
            if lib in item:
                # The module script keeps its `CircuitsVis.render(...)` call, now using the page's copy.
                item, needs_library = item.replace(lib, ""), True
                break
    if re.search(r"""(src|href|from)\s*=?\s*["'](https?:)?//""", item):
        raise ValueError("this HTML snippet loads a script or resource from the network (for circuitsvis: "
                         "str(view) or show_code() use a CDN); pass the view itself or view.local_src "
                         "to keep the report offline")
    return item, needs_library


def _table_html(df: pd.DataFrame) -> str:
    """The table as HTML, every float at the report's one precision (`num`)."""
    return df.to_html(index=False, border=0, classes="data", na_rep="", float_format=num, escape=True)


def _meta_html(meta: dict) -> str:
    rows = []
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            shown = f"<pre>{html.escape(json.dumps(value, indent=1, default=str))}</pre>"
        else:
            shown = html.escape(str(value))
        rows.append(f"<tr><td><strong>{html.escape(str(key))}</strong></td><td>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _anchor(i: int, title: str) -> str:
    return f"s{i}-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]


def render_report(title: str, sections: Sequence[Section], meta: dict | None = None) -> str:
    """The report's HTML text (see `write_report`)."""
    meta = dict(meta or {})
    meta.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    need_library = False
    body = []
    for i, sec in enumerate(sections):
        parts = [f'<section id="{_anchor(i, sec.title)}"><h2>{html.escape(sec.title)}</h2>']
        if sec.text:
            parts.append(text_to_html(sec.text))
        for fig in sec.figures:
            name = html.escape(Path(fig).name)
            parts.append(f'<figure><img class="figure" alt="{name}" src="{png_data_uri(fig)}">'
                         f"<figcaption>{name}</figcaption></figure>")
        for item in sec.html:
            snippet, lib = html_item(item)
            need_library |= lib
            parts.append(f'<div class="view">{snippet}</div>')
        if sec.table is not None:
            parts.append(_table_html(sec.table))
        parts.append("</section>")
        body.append("\n".join(parts))
    toc = "".join(f'<li><a href="#{_anchor(i, s.title)}">{html.escape(s.title)}</a></li>'
                  for i, s in enumerate(sections))
    library = ""
    if need_library:
        library = f"<script>\n{viz.circuitsvis_library()}\n</script>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n{library}\n</head>\n<body><main>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav><ol>{toc}</ol></nav>\n" + "\n".join(body)
        + f"\n<footer><h3>Run details</h3>{_meta_html(meta)}</footer>\n</main></body></html>\n"
    )


def write_report(path: str | Path, title: str, sections: Sequence[Section], meta: dict | None = None) -> Path:
    """Write ONE standalone HTML file (atomically) and return its path.

    `meta` (model fingerprint, git revision, settings, ...) goes in the footer.
    """
    return write_atomic(path, render_report(title, sections, meta))


# ------------------------------------------------------------------------------------------------
# the main job's report, from its output folder


def num(x: float | None) -> str:
    """A rate or a mean as every number of the report shows it: three decimals ("–" for none)."""
    return "–" if x is None else f"{x:.3f}"


def signed(x: float) -> str:
    """A difference: three decimals with its sign."""
    return f"{x:+.3f}"


def _verdict(c: Comparison, level: TaskLevel | None = None) -> str:
    """One sentence on a pooled comparison: the difference, its interval, and whether it could tell;
    then, with `level` (`comparisons.task_levels`), the same with the task as the unit."""
    lo, hi = c.ci
    what = f"{c.metric.replace('_', ' ')} {c.condition} - {c.baseline}"
    shown = f"{signed(c.diff)} [95% CI {signed(lo)}, {signed(hi)}], p = {c.p_value:.3g}"
    moved = f"{c.n_up} of {c.n_tasks} tasks up and {c.n_down} down after Holm"
    if lo > 0 or hi < 0:
        text = f"- {what}: {shown}: a {'rise' if lo > 0 else 'fall'} the comparison can tell ({moved})."
    else:
        text = (f"- {what}: {shown}: no difference detected; one of {num(c.mde)} or more would have been "
                f"found 80% of the time ({moved}).")
    if level is not None:
        tlo, thi = level.ci
        text += (f" Over tasks: {signed(level.mean)} [t interval {signed(tlo)}, {signed(thi)}], "
                 f"p = {level.p_value:.3g}; {level.n_up} tasks up, {level.n_down} down, sign test p = {level.sign_p:.3g}.")
    return text


#: the condition families of the copy-mechanism study's frozen arm, in the report's order (a set's rows carry
#: `@s<seed>`; `random-<n>@s<seed>` is the family `random`)
STUDY_ORDER = ("contextual", "batch", "pruned", "random", "pruned+contextual", "pruned+batch")


def _study_family(name: str) -> str:
    family = name.split("@")[0]
    return "random" if family.startswith("random-") else family


def _copy_mechanism(model_name: str, root: Path) -> Section:
    """What fixes copying on this model: the copy-mechanism study's committed summary
    (`docs/data/copy_mechanism_<model>.json` and its criteria, `analyses/copy_mechanism.py`), its
    verdicts by the two criteria, and the recommended flag; or how to run it where it has not run."""
    title = "What fixes copying: the copy-mechanism study"
    data = root / "docs" / "data"
    study, crit = data / f"copy_mechanism_{model_name}.json", data / f"copy_mechanism_{model_name}_criteria_neurons.json"
    if not (study.is_file() and crit.is_file()):
        return Section(title, f"The copy-mechanism study (docs/copy_mechanism.md) has not been run on {model_name}: "
                              f"`python analyses/copy_mechanism.py --model {model_name} --stage select` (then its other "
                              "stages and `--stage summary`) writes it.")
    doc, c = json.loads(study.read_text()), json.loads(crit.read_text())["criteria"]
    mech, versus = c["mechanism"]["mean_over_seeds"], c["versus_calibration"]["mean_over_seeds"]
    ci = lambda d, key="task_ci": f"{signed(d['diff'])} [{signed(d[key][0])}, {signed(d[key][1])}]"
    rows = [{"condition": name, "Δ accuracy [task CI]": ci(r["accuracy"]), "Δ copy rate [task CI]": ci(r["copy_rate"]),
             "Δ copy effect [task CI]": ci(r["copy_effect"]) if r["copy_effect"].get("task_ci") else "–",
             "perplexity cost %": f"{100 * r['ppl_increase']:.1f}"}
            for name, r in sorted(doc["table"].items(), key=lambda kv: (STUDY_ORDER.index(_study_family(kv[0])), kv[0]))
            if _study_family(name) in STUDY_ORDER and "heads" not in name]
    beats = [k for k, v in versus.items() if v["holds"]]
    fix = ("**an intervention beats calibration** (" + ", ".join(beats) + "): `mechcopy find --recipe copy-mechanism` "
           "writes it, `mechcopy evaluate --prune FILE` applies it" if beats else
           "**calibration is the fix**: no component set chosen on the copy probe beats it on held-out tasks; use "
           "`mechcopy evaluate --scoring labels --calibrate contextual`")
    if "heldout" in mech:
        h, vc = mech["heldout"], versus["pruned_vs_contextual"]
        verdicts = (f"- A copying mechanism (criterion 1, the neuron arm over seeds): "
                    f"{'yes' if mech['probe_test']['holds'] and h['holds'] else 'no'}; beyond size-matched random sets on "
                    f"held-out tasks {signed(h['mean'])} [task CI {signed(h['task_ci'][0])}, {signed(h['task_ci'][1])}].\n"
                    f"- Better than calibration (criterion 2): {'yes' if beats else 'no'}; neurons minus contextual "
                    f"calibration {signed(vc['mean'])} [task CI {signed(vc['task_ci'][0])}, {signed(vc['task_ci'][1])}].")
    else:   # no seed chose a neuron set: nothing to test, and the method is the unpruned model
        verdicts = ("- The neuron arm chose no set on any selection seed (none within the perplexity bound beat the "
                    "unpruned model on the probe's dev split): nothing to prune, so no copying mechanism to test, and "
                    "the method is the unpruned model against calibration.")
    text = (f"The study (criterion committed before its runs; docs/copy_mechanism.md) chose component sets on a copy "
            f"probe that shares no data with the evaluation, and read them on {len(doc['settings']['heldout_tasks'])} held-out "
            f"label tasks (each weighing the same): "
            f"unpruned accuracy {num(doc['unpruned']['accuracy'])}, copy rate {num(doc['unpruned']['copy_rate'])}, copy "
            f"effect {num(doc['unpruned']['copy_effect'])}; n = {doc['settings']['n']} prompts per task.\n\n"
            + verdicts + "\n\n"
            f"So {fix}. The table: each condition minus unpruned (no-gold prompts; the copy effect on copy-control "
            "prompts); `@s<seed>` is a selection seed's set, `random-` its size-matched random set. The head arms "
            "(exploratory) are in docs/copy_mechanism.md." + _attention_lever(model_name, data))
    return Section(title, text, table=pd.DataFrame(rows))


def _attention_lever(model_name: str, data: Path) -> str:
    """A sentence on the study's `heads-attn` arm where it ran on the model (exploratory: removing the answer
    position's attention to the demo labels in the top heads), from its docs JSON (the n = 100 rerun's if
    there is one): its accuracy change per seed and its gain minus contextual calibration's."""
    for stem in (f"copy_mechanism_{model_name}-n100_heads-attn", f"copy_mechanism_{model_name}_heads-attn"):
        study, crit = data / f"{stem}.json", data / f"{stem}_criteria_heads-attn.json"
        if study.is_file() and crit.is_file():
            break
    else:
        return ""
    doc = json.loads(study.read_text())
    versus = json.loads(crit.read_text())["criteria"]["versus_calibration"].get("mean_over_seeds", {})
    gains = [r["accuracy"]["diff"] for name, r in sorted(doc["table"].items()) if name.startswith("pruned@heads-attn-")]
    if not gains or "pruned_vs_contextual" not in versus:
        return ""
    vc = versus["pruned_vs_contextual"]
    text = (f"\n\nThe strongest mechanistic lever the study found (exploratory): removing the answer position's "
            f"attention to the demo labels in the top heads (`heads-attn`, n = {doc['settings']['n']}) changes held-out "
            f"accuracy by {', '.join(signed(g) for g in gains)} (per selection seed), at no perplexity cost; its gain "
            f"minus contextual calibration's is {signed(vc['mean'])} [task CI {signed(vc['task_ci'][0])}, "
            f"{signed(vc['task_ci'][1])}]" + (" (it beats calibration)." if vc["holds"] else ", so calibration stays the fix."))
    return text + _ordinary_icl(data / f"{stem}_standard.json")


def _ordinary_icl(path: Path) -> str:
    """A sentence on what `heads-attn` and contextual calibration cost ordinary ICL (the standard
    construction, demos drawn freely: `analyses/copy_mechanism.py`'s `standard_check`), where it ran."""
    if not path.is_file():
        return ""
    doc = json.loads(path.read_text())
    arm, cal = doc["over_seeds"].get("heads-attn"), doc["table"].get("contextual")
    if arm is None or cal is None:
        return ""
    ci = lambda d: f"[task CI {signed(d['task_ci'][0])}, {signed(d['task_ci'][1])}]"
    harm = lambda d: "it harms ordinary ICL" if d["harms"] else "no harm detected"
    return (f" Where the gold may be among the demos (the standard construction, where copying is often right), "
            f"it changes accuracy by {signed(arm['mean'])} {ci(arm)} over seeds ({harm(arm)}); contextual calibration "
            f"by {signed(cal['accuracy']['diff'])} {ci(cal['accuracy'])} ({harm(cal)}).")


def _answer(evaluation: Evaluation, evaluated: Components, fig_dir: Path) -> Section:
    """The headline: pooled paired differences (pruned - unpruned, pruned - random) beside the same with
    the task as the unit, and the forest plot."""
    basis = evaluated.meta.get("basis", "chosen on the probe's dev split")
    if not evaluated.pairs:
        return Section("The answer: nothing was pruned",
                       f"k = 0: {evaluated.why_empty}, so nothing was pruned and there is nothing to compare. "
                       "The sections below show the unpruned model.")
    pooled = {(c.condition, c.baseline, c.metric): c for c in evaluation.comparisons.get("pooled", [])}
    over = {(t.condition, t.baseline, t.metric): t for t in evaluation.task_level}
    lines = [_verdict(pooled[(cond, base, m)], over.get((cond, base, m))) for cond, base in viz.FOREST_PAIRS
             for m in ("accuracy", "copy_rate") if (cond, base, m) in pooled]
    n_tasks = next(iter(pooled.values())).n_tasks if pooled else 0
    text = (f"Does pruning the copy neurons change in-context learning beyond what removing any neurons does? "
            f"The {len(evaluated)} neurons pruned here: {basis}.\n\n"
            f"Paired over the same prompts, pooled over {n_tasks} held-out tasks (each task weighs the same; "
            "the probe, on which the neurons were chosen, is left out):\n\n" + "\n".join(lines) +
            "\n\nIntervals: task-stratified paired bootstrap (random sets resampled too); p: stratified "
            "sign-flip test; MDE: the smallest difference this comparison detects with 80% power. These hold "
            "the tasks fixed: they say whether these tasks moved. \"Over tasks\" takes each task's difference "
            "as one observation (t interval and test, exact sign test): a claim that pruning helps tasks like "
            "these rests on it, and where the two disagree the claim is about these tasks only.")
    forest = viz.save_figure(viz.plot_forest(evaluation.comparisons), fig_dir / "forest.png")
    return Section("The answer: paired differences, pooled over tasks", text, [forest])


def _per_task(settings: Settings, evaluated: Components, evaluation: Evaluation, fig_dir: Path
              ) -> tuple[Section, pd.DataFrame]:
    """Per-task bars and the mean over tasks per condition family."""
    cfg = settings.config
    df = viz.task_results_df(evaluation.rows)
    df["copy_effect"] = df["copy_effect"].astype(float)
    means = df.groupby("family")[["accuracy", "copy_rate"]].mean().round(3).reset_index()
    bars = viz.save_figure(viz.plot_task_bars(df), fig_dir / "tasks.png")
    shown = [f for f in ("unpruned", "pruned", "random", "bottom") if f in set(means["family"])]
    unp = means.set_index("family").loc[shown]
    text = (f"{len(evaluated)} copy neurons pruned on {settings.model_name}; {df['task'].nunique()} tasks, "
            f"{cfg.n_eval} prompts each (fewer where the data or tokenisation allow fewer), {cfg.shots} shots. "
            f"Mean over tasks: accuracy " + " vs ".join(f"{num(unp.loc[f, 'accuracy'])} {f}" for f in shown) +
            "; copy rate " + " vs ".join(f"{num(unp.loc[f, 'copy_rate'])} {f}" for f in shown) +
            f". Random = mean over {cfg.n_random} random neuron sets of the same size per layer; bottom = the "
            "lowest-scoring neurons. Whiskers: 95% intervals of each rate alone (the paired comparisons above "
            "are sharper). The table gives, beside the copy rate, the copy effect of closed-label tasks: "
            "P(answer = X | X among the demos) - P(answer = X | X absent), which a preference for a label "
            "does not raise (empty where the prompts cannot estimate it; the result JSON says why).")
    table = df.pivot_table(index="task", columns="family", values=["accuracy", "copy_rate", "copy_effect"],
                           dropna=False)
    table.columns = [f"{m} {c}" for m, c in table.columns]
    return Section("Accuracy and copy rate per task, before and after pruning", text, [bars],
                   table=table.reset_index()), means


def _selection(settings: Settings, evaluated: Components, choice: Choice, fig_dir: Path) -> Section:
    """The k sweep and where the neurons are."""
    cfg, sweep = settings.config.find, choice.sweep
    figs = []
    if sweep.rows:
        sdf = pd.DataFrame([sweep.baseline, *sweep.rows])
        figs.append(viz.save_figure(viz.plot_k_sweep(sdf, sweep.chosen_k), fig_dir / "k_sweep.png"))
    figs.append(viz.save_figure(viz.plot_layer_distribution(evaluated.layer_counts(settings.n_layers)),
                                fig_dir / "layers.png"))
    bound = "no perplexity bound" if sweep.max_ppl_increase is None else \
        f"perplexity bound +{100 * sweep.max_ppl_increase:.0f}%"
    gate = ("every layer" if cfg.max_completeness_error is None else
            f"the layers whose IG converged (median completeness error below {100 * cfg.max_completeness_error:.0f}%)")
    return Section(
        "Selecting the copy neurons",
        f"{'Integrated Gradients' if cfg.attribution == 'ig' else cfg.attribution} ({cfg.steps} steps, target "
        f"`{cfg.target}`) on {cfg.n} prompts of the {cfg.probe} probe, in {gate}; k chosen on {cfg.n_dev} dev "
        f"prompts of the probe, never on the evaluation tasks (chosen k = {sweep.chosen_k}, {bound}"
        f"{'' if sweep.chosen_k else ': ' + (sweep.why or choice.components.why_empty)}). Evaluated below: "
        f"{evaluated.meta.get('basis', 'the chosen set')}.", figs)


def _task_vectors(results: Sequence[TaskVectorResult], fig_dir: Path) -> Section:
    rows = [{"layer": layer, "task": r.task, "condition": r.condition, "accuracy": acc}
            for r in results for layer, acc in zip(r.layers, r.dev_accuracy)]
    tv_fig = viz.save_figure(viz.plot_tv_by_layer(pd.DataFrame(rows)), fig_dir / "task_vectors.png")
    table = pd.DataFrame([{
        "task": r.task, "condition": r.condition,
        "best layer": r.best_layer if r.any_layer_works else "none works",
        "test accuracy": num(r.test_accuracy) if r.any_layer_works else "–",
        "zero-shot accuracy": num(r.zero_shot_accuracy), "ICL accuracy": num(r.icl_accuracy),
        "copy rate": num(r.copy_rate) if r.any_layer_works else "–"} for r in results])
    return Section("Task vectors by layer, unpruned vs pruned",
                   "Dev accuracy by injection layer; the table gives test accuracy at the best dev layer beside "
                   "zero-shot and ICL accuracy. \"none works\": no layer's task vector gets a single dev prompt "
                   "right, so there is no best layer to test.", [tv_fig], table=table)


def _patching(patch: PatchingResult, fig_dir: Path) -> Section:
    comp = patch.components.index("resid_pre") if "resid_pre" in patch.components else 0
    values = patch.array()[comp]
    heat = viz.plot_patching_heatmap(values, patch.tokens[: values.shape[1]],
                                     f"{patch.task} / {patch.corruption}: {patch.components[comp]}")
    neurons = ("not patched (no neurons were evaluated)" if patch.neuron_all_positions is None else
               num(patch.neuron_all_positions))
    return Section("Activation patching",
                   f"Normalised logit difference when patching clean into corrupted ({patch.corruption}), "
                   f"averaged over {patch.n_pairs} prompt pairs (1: the clean run's, 0: the corrupted run's). "
                   f"The {patch.neurons} copy neurons patched at all positions: {neurons}.",
                   [viz.save_figure(heat, fig_dir / "patching.png")])


def _copy_error_up_close(views: Views | None) -> Section:
    """circuitsvis views of one copy error, drawn from the views stage's data."""
    title = "A copy error up close"
    if views is None:
        return Section(title, "This run's folder holds no views.json (the run was made before the views stage "
                              "existed): run `mechcopy reproduce` again with the same --out to add it.")
    p = views.prompt
    html_views: list[Any] = [viz.attention_heads_view(marked_tokens(views.tokens, a.marked), a.pattern, a.names,
                                                      f"Attention: {a.chosen_by}") for a in views.attention]
    if views.neurons is not None:
        html_views.append(viz.text_activations_view(views.tokens, views.neurons.activations, views.neurons.labels,
                                                    views.neurons.set_name))
    shown = [f"attention of {a.chosen_by}" for a in views.attention]
    if views.neurons is not None:
        shown.append(f"the activations of the {len(views.neurons.labels)} evaluated neurons most active on it")
    kind = "a copy error" if views.is_copy_error else "no copy error among the first dev prompts; the first one"
    return Section(title, f"A dev prompt of the run's probe ({kind}): gold answer {p.answer!r}, demo labels "
                          f"{list(p.demo_labels)}, model says {views.prediction!r}. Shown: "
                          + ("; ".join(shown) or "nothing more (no attention, no neurons)") + ".", html=html_views)


def build_report(out_dir: str | Path) -> dict[str, Any]:
    """Figures (PNG too) and circuitsvis views of a `mechcopy reproduce` folder, assembled into
    `out_dir/report.html`; returns what the report stage records. Reads the folder's files only
    (`job.Run.read`): no model is loaded or run."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    run = Run.read(out)
    per_task, means = _per_task(run.settings, run.evaluated, run.evaluation, fig_dir)
    sections = [_answer(run.evaluation, run.evaluated, fig_dir),
                _copy_mechanism(run.settings.model_name, Path(__file__).resolve().parents[1]), per_task,
                _selection(run.settings, run.evaluated, run.choice, fig_dir),
                _task_vectors(run.task_vectors, fig_dir), _patching(run.patching, fig_dir),
                _copy_error_up_close(run.views)]
    path = write_report(out / "report.html", f"mechcopy: copy neurons of {run.settings.model_name}", sections,
                        run.settings.to_json())
    return {"report": str(path), "figures": sorted(str(p) for p in fig_dir.glob("*.png")),
            "mean_over_tasks": means.to_dict("records")}
