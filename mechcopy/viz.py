"""Pictures: matplotlib figures on plain data, and circuitsvis views that render offline.

Figure functions take pandas DataFrames (columns documented per function) or arrays and return a
`matplotlib.figure.Figure` built without pyplot (no global state, never shown); `save_figure`
writes it as PNG. They never compute anything: analyses return results, these only draw them.

circuitsvis' own objects load their script from a CDN when printed with `str()`, and their
notebook display probes the internet (http://google.com) on every render. `CircuitsvisHTML`
inlines circuitsvis' bundled script instead, so views render with no network, in notebooks
(`_repr_html_`), in saved files (`.save`) and in the report (`mechcopy.report`), which includes
the script once for all views.
"""

from __future__ import annotations

import html
import io
import json
import re
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from matplotlib.figure import Figure

from mechcopy.arch import HookedModel, arch_of
from mechcopy.io import write_atomic
from mechcopy.stats import Comparison
from mechcopy.heads import require_heads
from mechcopy.views import MARK, attention_patterns, head_view, marked_tokens, neuron_activations

# A 1-D series of numbers: a list, a tuple or a numpy array.
Series = Sequence[float] | np.ndarray

# One colour per condition family, the same in every figure.
CONDITION_COLORS = {
    "unpruned": "#4C72B0",
    "pruned": "#DD8452",
    "random": "#8C8C8C",
    "bottom": "#55A868",
}
_EXTRA_COLORS = ["#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974", "#64B5CD"]
DPI = 110


# --------------------------------------------------------------------------- matplotlib figures


def _check_columns(df: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs DataFrame columns {list(needed)}; missing {missing} "
                         f"(got {list(df.columns)})")
    if len(df) == 0:
        raise ValueError(f"{what}: the DataFrame is empty, nothing to plot")


def _color(family: str, order: list[str]) -> str:
    if family in CONDITION_COLORS:
        return CONDITION_COLORS[family]
    extras = [f for f in order if f not in CONDITION_COLORS]
    return _EXTRA_COLORS[extras.index(family) % len(_EXTRA_COLORS)]


def _label(token: str) -> str:
    """A token as a tick label: visible whitespace, and no `$` (matplotlib would parse mathtext)."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def aggregate_conditions(df: pd.DataFrame, metrics=("accuracy", "copy_rate")) -> pd.DataFrame:
    """Collapse the conditions of one family (`random-0`, `random-1`, ... of family `random`) into one row
    per task and family (the `family` column; without it, every condition is its own family).

    A family with one row keeps its own interval (`<metric>_lo/_hi`). A family with several rows
    (seeds) gets the mean over seeds, and as interval the spread over seeds (min..max of the
    seeds' values), stated in the figure's legend as "(n seeds)".
    """
    rows = []
    if "family" not in df.columns:
        df = df.assign(family=df["condition"])
    for (task, family), g in df.groupby(["task", "family"], sort=False):
        row = {"task": task, "condition": family, "n_seeds": len(g)}
        for m in metrics:
            if len(g) == 1:
                row[m] = float(g[m].iloc[0])
                row[f"{m}_lo"] = float(g[f"{m}_lo"].iloc[0]) if f"{m}_lo" in g else np.nan
                row[f"{m}_hi"] = float(g[f"{m}_hi"].iloc[0]) if f"{m}_hi" in g else np.nan
            else:
                row[m] = float(g[m].mean())
                row[f"{m}_lo"] = float(g[m].min())
                row[f"{m}_hi"] = float(g[m].max())
        rows.append(row)
    return pd.DataFrame(rows)


def _ordered_families(families) -> list[str]:
    seen = list(dict.fromkeys(families))
    known = [f for f in CONDITION_COLORS if f in seen]
    return known + [f for f in seen if f not in CONDITION_COLORS]


def task_results_df(results) -> pd.DataFrame:
    """Result rows (`suite.ResultRow`), `TaskResult`s, or their `to_json()` dicts as the table
    `plot_task_bars` draws.

    Columns: task, condition, family (the row's spec family; the condition itself where a result
    carries no spec), n, accuracy, accuracy_lo, accuracy_hi, copy_rate, copy_rate_lo, copy_rate_hi,
    copy_effect (None / NaN where a row has none or it cannot be estimated), copy_share_of_errors, other_rate.
    """
    rows = []
    for r in results:
        d = r if isinstance(r, dict) else r.to_json()
        effect = (d.get("copy_effect") or {}).get("effect")
        rows.append({
            "task": d["task"], "condition": d["condition"],
            "family": (d.get("spec") or {}).get("family", d["condition"]), "n": d["n"],
            "accuracy": d["accuracy"], "accuracy_lo": d["accuracy_ci"][0], "accuracy_hi": d["accuracy_ci"][1],
            "copy_rate": d["copy_rate"], "copy_rate_lo": d["copy_rate_ci"][0], "copy_rate_hi": d["copy_rate_ci"][1],
            "copy_effect": effect,
            "copy_share_of_errors": d.get("copy_share_of_errors"), "other_rate": d.get("other_rate"),
        })
    return pd.DataFrame(rows)


def plot_task_bars(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Accuracy and copy rate per task and condition: one row per task (so any number of tasks reads at
    page width), the two rates side by side, bars with interval whiskers.

    Columns: task, condition, accuracy, accuracy_lo, accuracy_hi, copy_rate, copy_rate_lo,
    copy_rate_hi (rates in [0, 1]; `_lo/_hi` a confidence interval), and optionally family. Conditions
    such as `unpruned`, `pruned`, `random-0..n` (family `random`: drawn as one bar, mean over seeds,
    whisker = spread over seeds) and `bottom`.
    """
    _check_columns(df, ["task", "condition", "accuracy", "accuracy_lo", "accuracy_hi",
                        "copy_rate", "copy_rate_lo", "copy_rate_hi"], "plot_task_bars")
    agg = aggregate_conditions(df)
    tasks = list(dict.fromkeys(agg["task"]))
    families = _ordered_families(agg["condition"])
    n_t, n_c = len(tasks), len(families)
    height = 0.8 / n_c
    fig = Figure(figsize=(10.0, 1.6 + n_t * (0.1 + 0.08 * n_c)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(n_t)[::-1]                  # the first task on top
    for ax, metric, name in zip(axes, ("accuracy", "copy_rate"), ("accuracy", "copy-error rate")):
        for j, fam in enumerate(families):
            sub = agg[agg["condition"] == fam].set_index("task").reindex(tasks)
            val = sub[metric].to_numpy(float)
            lo = np.clip(val - sub[f"{metric}_lo"].to_numpy(float), 0, None)
            hi = np.clip(sub[f"{metric}_hi"].to_numpy(float) - val, 0, None)
            seeds = int(sub["n_seeds"].max()) if sub["n_seeds"].notna().any() else 1
            label = fam + (f" (mean of {seeds} seeds; whisker = range)" if seeds > 1 else "")
            ax.barh(y + 0.4 - height * (j + 0.5), val, height, color=_color(fam, families), label=label,
                    xerr=np.nan_to_num(np.vstack([lo, hi])), capsize=1.5, error_kw={"elinewidth": 0.7})
        ax.set_xlabel(name)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.6, n_t - 0.4)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_yticks(y, [_label(t) for t in tasks], fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, ncols=min(n_c, 4), loc="outside lower center")
    fig.suptitle(title or "ICL accuracy and copy-error rate per task (whiskers: 95% interval)")
    return fig


FOREST_PAIRS = (("pruned", "unpruned"), ("pruned", "random"))


def plot_forest(comparisons: Mapping[str, Sequence[Comparison]], pairs: Sequence[tuple[str, str]] = FOREST_PAIRS,
                metrics: Sequence[str] = ("accuracy", "copy_rate"), title: str | None = None) -> Figure:
    """Paired differences per task with 95% intervals, the pooled difference last (a diamond).

    `comparisons` is {task or "pooled": [Comparison, ...]} as `comparisons.compare_rows` returns. One
    panel per metric (rows) and (condition, baseline) pair (columns); filled markers are significant at
    0.05 (per task, unadjusted); each panel's title gives the pooled difference and its minimal detectable
    effect.
    """
    tasks = [t for t in comparisons if t != "pooled"] + (["pooled"] if "pooled" in comparisons else [])
    if not tasks:
        raise ValueError("plot_forest: no comparisons to draw")
    fig = Figure(figsize=(5.0 * len(pairs), 0.28 * len(tasks) * len(metrics) + 2.2 * len(metrics)),
                 layout="constrained")
    axes = fig.subplots(len(metrics), len(pairs), squeeze=False)
    y = np.arange(len(tasks))[::-1]
    for (mi, metric), (pi, (cond, base)) in [(m, p) for m in enumerate(metrics) for p in enumerate(pairs)]:
        ax = axes[mi][pi]
        found = {t: c for t in tasks for c in comparisons[t]
                 if (c.condition, c.baseline, c.metric) == (cond, base, metric)}
        for yi, t in zip(y, tasks):
            c = found.get(t)
            if c is None:
                continue
            pooled = t == "pooled"
            color = "k" if pooled else CONDITION_COLORS.get(cond, "#444444")
            ax.errorbar(c.diff, yi, xerr=[[c.diff - c.ci[0]], [c.ci[1] - c.diff]],
                        fmt="D" if pooled else "o", ms=7 if pooled else 4, color=color, ecolor=color,
                        mfc=color if c.p_value < 0.05 else "white", elinewidth=1.6 if pooled else 0.9)
        ax.axvline(0, color="#888888", lw=0.8)
        ax.set_yticks(y, [_label(t) for t in tasks], fontsize=7)
        ax.set_xlabel(f"{metric.replace('_', ' ')}: {cond} - {base}")
        ax.grid(axis="x", alpha=0.3)
        p = found.get("pooled")
        ax.set_title(f"pooled {p.diff:+.3f} [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}], MDE {p.mde:.3f}"
                     if p else f"{cond} - {base}", fontsize=8)
    fig.suptitle(title or "Paired differences per task (95% intervals; filled: p < 0.05)")
    return fig


def plot_k_sweep(df: pd.DataFrame, chosen_k: int | None = None, title: str | None = None) -> Figure:
    """The dev-set sweep over the number of pruned neurons k.

    Columns: k, dev_accuracy, dev_copy_rate, ppl_increase (relative, e.g. 0.02 = +2%); an optional
    boolean column `chosen` marks the chosen k when `chosen_k` is not given.
    """
    _check_columns(df, ["k", "dev_accuracy", "dev_copy_rate", "ppl_increase"], "plot_k_sweep")
    df = df.sort_values("k")
    if chosen_k is None and "chosen" in df.columns and df["chosen"].astype(bool).any():
        chosen_k = int(df.loc[df["chosen"].astype(bool), "k"].iloc[0])
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    k = df["k"].to_numpy(float)
    ax.plot(k, df["dev_accuracy"], "o-", color=CONDITION_COLORS["unpruned"], label="dev accuracy")
    ax.plot(k, df["dev_copy_rate"], "s-", color=CONDITION_COLORS["pruned"], label="dev copy-error rate")
    ax.set_xlabel("k (neurons pruned)")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.05)
    positive = k[k > 0]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_xscale("symlog", linthresh=max(1.0, positive.min()))
        ax.set_xticks(k, [f"{v:g}" for v in k])
        ax.minorticks_off()
    ax2 = ax.twinx()
    ax2.plot(k, 100 * df["ppl_increase"].to_numpy(float), "^--", color="#55A868", label="perplexity increase")
    ax2.set_ylabel("perplexity increase (%)")
    if chosen_k is not None:
        ax.axvline(chosen_k, color="k", ls=":", lw=1.2, label=f"chosen k = {chosen_k}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.suptitle(title or "Choosing k on the probe dev split")
    return fig


def plot_k_curve(curve: Mapping[str | int, Sequence[Comparison]], chosen_k: int | None = None,
                 pairs: Sequence[tuple[str, str]] = FOREST_PAIRS, metrics: Sequence[str] = ("accuracy", "copy_rate"),
                 title: str | None = None) -> Figure:
    """Pooled paired differences along k with 95% intervals: the k curve on the tasks.

    `curve` is {k: [Comparison, ...]} (the "pooled" entry of `comparisons.compare_rows` for each k).
    One panel per metric, one line per (condition, baseline) pair; filled markers: p < 0.05;
    a dotted line marks `chosen_k`, the dev split's choice (k = 0: no pruning).
    """
    if not curve:
        raise ValueError("plot_k_curve: no k to draw")
    by_k = {int(k): cs for k, cs in curve.items()}
    ks = sorted(by_k)
    fig = Figure(figsize=(5.0 * len(metrics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colors = {pair: CONDITION_COLORS.get(pair[1], _EXTRA_COLORS[i]) for i, pair in enumerate(pairs)}
    for ax, metric in zip(axes, metrics):
        for i, pair in enumerate(pairs):
            found = {k: c for k in ks for c in by_k[k] if (c.condition, c.baseline, c.metric) == (*pair, metric)}
            if not found:
                continue
            x = np.array(list(found), float) * (1 + 0.04 * (i - (len(pairs) - 1) / 2))   # dodge, on a log axis
            d = np.array([c.diff for c in found.values()])
            err = np.array([[c.diff - c.ci[0], c.ci[1] - c.diff] for c in found.values()]).T
            ax.errorbar(x, d, yerr=err, fmt="-", color=colors[pair], lw=1.2, elinewidth=0.9, capsize=2,
                        label=f"{pair[0]} - {pair[1]}")
            for xi, di, c in zip(x, d, found.values()):
                ax.plot(xi, di, "o", ms=5, color=colors[pair], mfc=colors[pair] if c.p_value < 0.05 else "white")
        ax.axhline(0, color="#888888", lw=0.8)
        if chosen_k:
            ax.axvline(chosen_k, color="k", ls=":", lw=1.2, label=f"chosen k = {chosen_k}")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (neurons pruned)")
        ax.set_ylabel(f"pooled {metric.replace('_', ' ')} difference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle((title or "The k curve on the tasks (95% intervals; filled: p < 0.05)")
                 + ("\nthe dev split chose k = 0: no pruning" if chosen_k == 0 else ""))
    return fig


def plot_layer_distribution(counts: Sequence[int] | np.ndarray, title: str | None = None) -> Figure:
    """Number of selected neurons per layer (`counts[l]` for layer l, e.g. `NeuronSet.layer_counts()`)."""
    counts = [int(c) for c in counts]
    if not counts:
        raise ValueError("plot_layer_distribution: counts is empty (one entry per layer expected)")
    fig = Figure(figsize=(max(5.0, 0.25 * len(counts) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), counts, color=CONDITION_COLORS["pruned"])
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_xticks(np.arange(0, len(counts), max(1, len(counts) // 15)))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.suptitle(title or f"Copy neurons per layer ({sum(counts)} in all)")
    return fig


def plot_tv_by_layer(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Task-vector accuracy against the injection layer.

    Columns: layer, task, condition (e.g. unpruned / pruned), accuracy. One thin line per task
    (colour) and condition (line style); with several tasks, a thick line per condition gives
    the mean over tasks.
    """
    _check_columns(df, ["layer", "task", "condition", "accuracy"], "plot_tv_by_layer")
    tasks = list(dict.fromkeys(df["task"]))
    conds = list(dict.fromkeys(df["condition"]))
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    many = len(tasks) > 1
    for ci, cond in enumerate(conds):
        for ti, task in enumerate(tasks):
            sub = df[(df["task"] == task) & (df["condition"] == cond)].sort_values("layer")
            if len(sub):
                ax.plot(sub["layer"], sub["accuracy"], styles[ci % 4], color=cmap(ti % cmap.N),
                        lw=0.9 if many else 1.8, alpha=0.6 if many else 1.0,
                        label=f"{task} ({cond})" if len(tasks) <= 6 or ci == 0 else None)
        if many:
            mean = df[df["condition"] == cond].groupby("layer")["accuracy"].mean()
            ax.plot(mean.index, mean.to_numpy(), styles[ci % 4], color="k", lw=2.4,
                    label=f"mean over tasks ({cond})")
    ax.set_xlabel("layer (task vector taken and injected after it)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "Task-vector accuracy by layer")
    return fig


def plot_patching_heatmap(values: Float[np.ndarray, "layers positions"] | torch.Tensor,
                          token_labels: Sequence[str], title: str = "Activation patching") -> Figure:
    """A layers x positions heatmap (e.g. normalised logit difference), centred on zero."""
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if values.ndim != 2:
        raise ValueError(f"plot_patching_heatmap: values must be 2-D [layers, positions], got shape {values.shape}")
    if len(token_labels) != values.shape[1]:
        raise ValueError(f"plot_patching_heatmap: {len(token_labels)} token labels for {values.shape[1]} positions")
    n_l, n_p = values.shape
    vmax = float(np.nanmax(np.abs(values))) or 1.0
    fig = Figure(figsize=(max(5.0, 0.32 * n_p + 2.5), max(3.0, 0.18 * n_l + 1.8)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(n_p), [_label(t) for t in token_labels], rotation=90, fontsize=7)
    ax.set_yticks(np.arange(0, n_l, max(1, n_l // 15)))
    ax.set_xlabel("position (token)")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, shrink=0.9)
    ax.set_title(_label(title))
    return fig


def _head_panel(fig: Figure, ax, values: np.ndarray, title: str, label: str, top: int, centre: bool,
                outline: Sequence[tuple[int, int]] | None = None) -> None:
    """One layers x heads heatmap on `ax`, the `top` heads by absolute value outlined and named (or the
    (layer, head) pairs of `outline`, e.g. another ranking's top heads)."""
    from matplotlib.patches import Rectangle

    if values.ndim != 2:
        raise ValueError(f"a head map must be 2-D [layers, heads], got shape {values.shape}")
    n_l, n_h = values.shape
    finite = values[np.isfinite(values)]
    if centre:
        vmax = float(np.abs(finite).max()) if finite.size else 1.0
        im = ax.imshow(values, cmap="RdBu_r", vmin=-(vmax or 1.0), vmax=vmax or 1.0, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(n_h), [str(h) for h in range(n_h)], fontsize=7)
    ax.set_yticks(np.arange(0, n_l, max(1, n_l // 15)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, shrink=0.9, label=label)
    order = ([int(l) * n_h + int(h) for l, h in outline] if outline is not None else
             [int(i) for i in np.argsort(-np.nan_to_num(np.abs(values), nan=-1).ravel(), kind="stable")[:top]])
    names = []
    for i in order:
        l, h = divmod(i, n_h)
        ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="k", lw=1.4))
        names.append(f"L{l}H{h}" if outline is not None else f"L{l}H{h} {values[l, h]:+.3g}")
    if outline is not None:          # given heads: their names only, four to a line
        lines = [", ".join(names[i:i + 4]) for i in range(0, len(names), 4)]
        ax.set_title("\n".join([*map(_label, title.split("\n")), *lines]), fontsize=8)
        return
    ax.set_title(_label(title) + (("\ntop: " + ", ".join(names[:3]) + ("\n" + ", ".join(names[3:]) if names[3:] else ""))
                                  if names else ""), fontsize=8)


def _as_array(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)


def plot_head_heatmap(values: Float[np.ndarray, "layers heads"] | torch.Tensor, title: str = "Heads",
                      label: str = "", top: int = 5, centre: bool = True) -> Figure:
    """A layers x heads heatmap (attribution, label attention, per-head patching), the `top` heads by
    absolute value outlined and named (LxHy). `centre`: a diverging scale centred on zero (signed
    values); else a sequential one (e.g. attention weights)."""
    values = _as_array(values)
    if values.ndim != 2:
        raise ValueError(f"plot_head_heatmap: values must be 2-D [layers, heads], got shape {values.shape}")
    fig = Figure(figsize=(max(3.6, 0.42 * values.shape[1] + 2.6), max(3.0, 0.2 * values.shape[0] + 1.8)),
                 layout="constrained")
    _head_panel(fig, fig.subplots(), values, title, label, top, centre)
    return fig


def plot_head_maps(panels: dict[str, dict], title: str = "", top: int = 5) -> Figure:
    """Several layers x heads maps side by side: `panels` is {panel title: {"values": [layers, heads],
    "label": colour-bar label, "centre": bool (default True), "outline": (layer, head) pairs to outline and
    name instead of the `top` by absolute value (optional)}}, each drawn as `plot_head_heatmap` draws one."""
    if not panels:
        raise ValueError("plot_head_maps: no panels to draw")
    arrays = {k: _as_array(p["values"]) for k, p in panels.items()}
    n_l, n_h = next(iter(arrays.values())).shape
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(cols * max(3.0, 0.28 * n_h + 2.2), rows * max(3.0, 0.16 * n_l + 1.9)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, p) in zip(axes, panels.items()):
        _head_panel(fig, ax, arrays[name], name, p.get("label", ""), top, p.get("centre", True), p.get("outline"))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(_label(title), fontsize=10)
    return fig


def plot_loss_curve(steps: Series, losses: Series | dict[str, Series],
                    title: str | None = None, evals: Mapping[str, tuple[Series, Series]] | None = None,
                    smooth: int = 1) -> Figure:
    """Training loss against step (log scale when it spans more than a factor of 10).

    `losses` is one series or several by name (e.g. all outputs and the query alone), each smoothed by a
    trailing mean over `smooth` steps. With `evals` ({name: (steps, accuracies)}) a second panel shows
    evaluation accuracies during training.
    """
    x = np.asarray(steps, float)
    series = {"loss": losses} if not isinstance(losses, dict) else losses
    fig = Figure(figsize=(9.0 if evals else 6.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    span = []
    for i, (name, raw) in enumerate(series.items()):
        values = np.asarray(raw, float)
        if values.shape != x.shape or x.ndim != 1 or len(x) == 0:
            raise ValueError(f"plot_loss_curve: steps and losses must be equal-length 1-D, got {x.shape}, {values.shape}")
        if smooth > 1:
            csum = np.cumsum(np.insert(values, 0, 0.0))
            lo = np.maximum(0, np.arange(len(values)) - smooth + 1)
            values = (csum[1:] - csum[lo]) / (np.arange(len(values)) + 1 - lo)
        axes[0].plot(x, values, color=CONDITION_COLORS["unpruned"] if i == 0 else None, lw=1.4, label=name)
        span += [values.min(), values.max()]
    if min(span) > 0 and max(span) / min(span) > 10:
        axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].grid(alpha=0.3)
    if len(series) > 1:
        axes[0].legend(fontsize=8)
    if evals:
        for name, (at, accuracy) in evals.items():
            axes[1].plot(at, accuracy, marker=".", label=name)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("accuracy")
        axes[1].set_ylim(0, 1)
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8)
    fig.suptitle(title or "Training loss")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` as PNG to `path` atomically (temporary file beside it, then rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- circuitsvis, offline


@lru_cache(maxsize=1)
def circuitsvis_library() -> str:
    """circuitsvis' bundled browser script (defines `CircuitsVis`), safe to inline in <script>.

    The same text circuitsvis inlines in `local_src`, minus its source-map comment (a browser with
    developer tools open would try to fetch `iife.js.map`).
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise FileNotFoundError(f"circuitsvis' bundled script is missing ({path}); reinstall circuitsvis")
    js = path.read_text(encoding="utf-8").replace("</script>", "")
    return re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", js)


def _js_props(props: dict) -> str:
    """Props as a JS object literal; `</` escaped so a token such as `</script>` cannot end the script."""
    from circuitsvis.utils.convert_props import convert_props

    return convert_props(props).replace("</", "<\\/")


@dataclass(frozen=True, repr=False)
class CircuitsvisHTML:
    """A circuitsvis view that renders with no network.

    `component` is the circuitsvis React component (e.g. "AttentionHeads"), `props` its JSON
    properties. `local_src` is a self-contained snippet (script inlined, ~1.3 MB); `snippet()`
    without the library is what the report uses, adding the script once per page.
    """

    component: str
    props: str
    title: str = ""

    @classmethod
    def build(cls, component: str, title: str = "", **props) -> "CircuitsvisHTML":
        return cls(component, _js_props(props), title)

    def snippet(self, include_library: bool = True) -> str:
        div = f"circuits-vis-{uuid.uuid4().hex[:12]}"
        call = f'CircuitsVis.render("{div}", CircuitsVis.{self.component}, {self.props});'
        if include_library:
            # A module script keeps `CircuitsVis` local, so several views in one notebook don't clash.
            return (f'<div id="{div}" style="margin: 15px 0;"></div>\n'
                    f'<script type="module">\n{circuitsvis_library()}\n{call}\n</script>')
        return f'<div id="{div}" class="circuitsvis" style="margin: 15px 0;"></div>\n<script>{call}</script>'

    def page_snippet(self, define_library: bool) -> str:
        """This view for a page that holds the script once (a notebook): `define_library` defines the
        global `CircuitsVis` here (the page's first view); otherwise the view renders once the page's
        copy is there, and says what to do if it never comes."""
        div = f"circuits-vis-{uuid.uuid4().hex[:12]}"
        call = f'CircuitsVis.render("{div}", CircuitsVis.{self.component}, {self.props});'
        if define_library:
            return (f'<div id="{div}" style="margin: 15px 0;"></div>\n'
                    f"<script>\n{circuitsvis_library()}\n{call}\n</script>")
        missing = ("circuitsvis' script is not on this page (it comes with the first view a kernel shows): "
                   "run that cell again, or run mechcopy.viz.reset_notebook_script() and then this one")
        return (f'<div id="{div}" style="margin: 15px 0;"></div>\n<script>(function draw(tries) {{\n'
                f'  if (window.CircuitsVis) {{ {call} }}\n'
                f"  else if (tries < 100) {{ setTimeout(function () {{ draw(tries + 1); }}, 100); }}\n"
                f'  else {{ document.getElementById("{div}").textContent = {json.dumps(missing)}; }}\n'
                f"}})(0);</script>")

    @property
    def local_src(self) -> str:
        return self.snippet(include_library=True)

    def _repr_html_(self) -> str:
        """In a Jupyter kernel, circuitsvis' 1.3 MB script comes with the first view only (see
        `_notebook_defines_library`); anywhere else each view carries it (`local_src`)."""
        define = _notebook_defines_library()
        return self.local_src if define is None else self.page_snippet(define)

    def __repr__(self) -> str:
        return f"CircuitsvisHTML({self.component}, {self.title!r}, props: {len(self.props) / 1e3:.1f} kB)"

    def __html__(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page with this view (no network needed to open it)."""
        page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title or self.component)}</title></head>\n<body>\n"
                f"{self.local_src}\n</body></html>\n")
        return write_atomic(path, page)


_NOTEBOOK_SCRIPT: dict[str, str | None] = {}


def _notebook_defines_library() -> bool | None:
    """Whether the view displayed now must define the page's circuitsvis script; None outside a Jupyter kernel.

    The first view a kernel displays defines it, as does a later one in the cell that defined it when
    that cell runs again (its old output, and the script, are being replaced; JupyterLab says which
    cell runs). Colab shows each output in its own frame, so there every view carries the script.
    """
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return None
    if "google.colab" in sys.modules:
        return None
    parent = getattr(shell, "parent_header", None) or {}
    run = str(parent.get("header", {}).get("msg_id", ""))
    cell = (parent.get("metadata") or {}).get("cellId")
    if not _NOTEBOOK_SCRIPT or (cell is not None and cell == _NOTEBOOK_SCRIPT["cell"]
                                and run != _NOTEBOOK_SCRIPT["run"]):
        _NOTEBOOK_SCRIPT.update(cell=cell, run=run)
        return True
    return False


def reset_notebook_script() -> None:
    """Make the next view displayed in this kernel carry circuitsvis' script again (for a page that lost it)."""
    _NOTEBOOK_SCRIPT.clear()


def attention_heads_view(tokens: Sequence[str], pattern, names: Sequence[str], title: str = "Attention"
                         ) -> CircuitsvisHTML:
    """circuitsvis attention heads from data: `pattern` [heads, dest, src] over `tokens`, one name per head.

    Uses the `AttentionHeads` component (what `circuitsvis.attention.attention_heads` renders; the
    older `attention_patterns` is deprecated in circuitsvis).
    """
    pattern = np.asarray(pattern.detach().cpu().double() if isinstance(pattern, torch.Tensor) else pattern, float)
    if pattern.ndim != 3 or pattern.shape[0] != len(names) or pattern.shape[1:] != (len(tokens), len(tokens)):
        raise ValueError(f"attention_heads_view: pattern of shape {pattern.shape} for {len(names)} heads over "
                         f"{len(tokens)} tokens (expected [heads, tokens, tokens])")
    return CircuitsvisHTML.build("AttentionHeads", title=title, attention=pattern.round(4), tokens=list(tokens),
                                 attentionHeadNames=list(names), maskUpperTri=True)


def attention_view(model: HookedModel, text: str, layer: int, heads: Sequence[int] | None = None) -> CircuitsvisHTML:
    """circuitsvis attention heads of `layer` on `text` (`mechcopy.views.attention_patterns`)."""
    head_ids = list(range(arch_of(model).attention_shape(model)[0])) if heads is None else [int(h) for h in heads]
    pattern = attention_patterns(model, text, [(layer, h) for h in head_ids])
    return attention_heads_view(arch_of(model).str_tokens(model, text), pattern, [f"L{layer}H{h}" for h in head_ids],
                                f"Attention, layer {layer}")


def text_activations_view(tokens: Sequence[str], activations, labels: Sequence[str], set_name: str = "neurons"
                          ) -> CircuitsvisHTML:
    """circuitsvis `TextNeuronActivations` from data: `activations` [tokens, n] of the n `labels`."""
    acts = np.asarray(activations.detach().cpu().double() if isinstance(activations, torch.Tensor) else activations,
                      float)
    if acts.ndim != 2 or acts.shape != (len(tokens), len(labels)):
        raise ValueError(f"text_activations_view: activations of shape {acts.shape} for {len(tokens)} tokens and "
                         f"{len(labels)} labels (expected [tokens, labels])")
    return CircuitsvisHTML.build(
        "TextNeuronActivations", title=f"{len(labels)} neurons' activations", tokens=list(tokens),
        activations=acts[:, None, :].round(4),  # [tokens, 1, neurons]
        firstDimensionName="Set", secondDimensionName="Neuron", firstDimensionLabels=[set_name],
        secondDimensionLabels=list(labels))


def head_attention_view(model: HookedModel, prompt, heads: Sequence[tuple[int, int]],
                        mark: str = MARK) -> CircuitsvisHTML:
    """circuitsvis attention patterns of `heads` ((layer, head) pairs, any layers) on an ICL prompt
    (`ICLPrompt`), its demo-label tokens marked (`mark`, a format with one `{}`), so a copy error's
    attention to the labels shows. Named `L{layer}H{head}` (the data: `mechcopy.views.head_view`).
    `prompt` is not annotated so that a model without heads is refused for that first, whatever the prompt."""
    require_heads(model, "head_attention_view")
    view = head_view(model, prompt, heads, "chosen heads")
    return attention_heads_view(marked_tokens(arch_of(model).str_tokens(model, prompt.text), view.marked, mark),
                                view.pattern, view.names, "Attention of chosen heads (demo-label tokens marked)")


def neuron_activations_view(model: HookedModel, text: str, neurons, max_neurons: int | None = 200) -> CircuitsvisHTML:
    """Activations of the neurons in `neurons` (`Components` of neurons) over the tokens of `text`.

    Read at each layer's neuron site (`mechcopy.sites.neuron_site`, so transformers and Mamba
    alike: `mechcopy.views.neuron_activations`) and shown with circuitsvis' `TextNeuronActivations`, one
    entry per neuron labelled `L{layer}N{index}`. With more than `max_neurons` neurons, the ones with the
    largest absolute activation on this text are kept.
    """
    acts, labels = neuron_activations(model, text, neurons, max_neurons)
    return text_activations_view(arch_of(model).str_tokens(model, text), acts, labels,
                                 str(neurons.meta.get("name", "neurons")))


def to_json_props(view: CircuitsvisHTML) -> dict:
    """The view's properties as a Python dict (for tests and for saving the data beside a figure)."""
    return json.loads(view.props.replace("<\\/", "</"))


def plot_neuron_cards(cards, n_tokens: int = 6, title: str | None = None) -> Figure:
    """Neuron cards (`mechcopy.cards.NeuronCard`, one or several), one row each, three panels:
    the tokens its direction promotes / suppresses (direct logit effect), its mean last-position
    activation by gold label and by copied label, and the predicted labels' counts unpruned vs with
    the neuron alone pruned."""
    cards = [cards] if not isinstance(cards, (list, tuple)) else list(cards)
    if not cards:
        raise ValueError("plot_neuron_cards: no cards to draw")
    fig = Figure(figsize=(13.0, 2.9 * len(cards) + 0.4), layout="constrained")
    axes = fig.subplots(len(cards), 3, squeeze=False)
    for card, (ax_w, ax_a, ax_p) in zip(cards, axes):
        name = f"L{card.layer} N{card.index}" + (f" (score {card.score:.3g})" if card.score is not None else "")
        tokens = list(card.promoted[:n_tokens]) + list(card.suppressed[:n_tokens])[::-1]
        y = np.arange(len(tokens))[::-1]
        ax_w.barh(y, [v for _, v in tokens], color=["#55A868" if v > 0 else "#C44E52" for _, v in tokens])
        ax_w.set_yticks(y, [_label(repr(t)[1:-1]) for t, _ in tokens], fontsize=7)
        ax_w.axvline(0, color="k", lw=0.6)
        ax_w.set_title(f"{name}: writes (direct logit effect)", fontsize=9)
        by_gold, by_copy = card.activation_by_gold(), card.activation_by_copied()
        labels = sorted(set(by_gold) | set(by_copy), key=lambda s: (s == "no copy", s))
        x = np.arange(len(labels))
        ax_a.bar(x - 0.2, [by_gold.get(l, np.nan) for l in labels], 0.4, label="by gold label",
                 color=CONDITION_COLORS["unpruned"])
        ax_a.bar(x + 0.2, [by_copy.get(l, np.nan) for l in labels], 0.4, label="by copied label",
                 color=CONDITION_COLORS["pruned"])
        ax_a.set_xticks(x, [_label(l) for l in labels], fontsize=8)
        ax_a.axhline(0, color="k", lw=0.6)
        ax_a.set_title("fires: mean activation at the last position", fontsize=9)
        ax_a.legend(fontsize=7)
        before, after = card.label_counts(), card.label_counts(pruned=True)
        answers = sorted(set(before) | set(after))
        x = np.arange(len(answers))
        ax_p.bar(x - 0.2, [before.get(a, 0) for a in answers], 0.4, label="unpruned",
                 color=CONDITION_COLORS["unpruned"])
        ax_p.bar(x + 0.2, [after.get(a, 0) for a in answers], 0.4, label="this neuron pruned",
                 color=CONDITION_COLORS["pruned"])
        ax_p.set_xticks(x, [_label(a) for a in answers], fontsize=8)
        ax_p.set_title("predicted labels (counts)", fontsize=9)
        ax_p.legend(fontsize=7)
    fig.suptitle(title or "Neuron cards")
    return fig
