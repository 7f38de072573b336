"""Choosing how much to prune on the probe's dev split: the k sweep (`sweep_k`, the method's choice of
k) and the single-layer x percent sweep (`sweep_layer_percent`).

Every point of a sweep is measured the same way (`_measure`): dev accuracy and copy rate under the
pruning hooks, and what pruning costs general ability (relative perplexity on held-out text, and/or
accuracy on general prompts). The dev split of the probe is the only tuning data; never pass
evaluation-task prompts here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mechcopy.arch import HookedModel
from mechcopy.attribution import CopyScores
from mechcopy.components import component_kind
from mechcopy.errors import FieldError
from mechcopy.evaluation import evaluate, perplexity
from mechcopy.fingerprint import model_fingerprint
from mechcopy.hooks import Hook
from mechcopy.progress import tqdm
from mechcopy.pruning import pruning_hooks
from mechcopy.selection import select, select_layer_percent

DEFAULT_KS = (5, 10, 20, 50, 100, 200, 500, 1000)
#: the k grid over attention heads (270 on SmolLM2, 72 on Gemma-3-270M; valid_ks drops the k a model lacks)
HEAD_KS = (1, 2, 3, 5, 10, 20, 50, 100)


def default_ks(kind: str = "neuron") -> tuple[int, ...]:
    """The default k grid of the sweep for a component kind."""
    return HEAD_KS if kind == "head" else DEFAULT_KS


def _measure(model: HookedModel, dev_prompts: Sequence, hooks: list[tuple[str, Hook]], name: str, seed: int,
             text: str | None = None, n_tokens: int = 4096, ppl: bool = False,
             general_prompts: Sequence | None = None) -> dict[str, Any]:
    """One point of a sweep: dev accuracy and copy rate under `hooks`; with `ppl`, the perplexity of
    `text`; with `general_prompts`, the accuracy on them."""
    res = evaluate(model, dev_prompts, fwd_hooks=hooks, condition=name, seed=seed, n_boot=200)
    row: dict[str, Any] = {"dev_accuracy": res.accuracy, "dev_copy_rate": res.copy_rate}
    if ppl:
        row["ppl"] = perplexity(model, text, fwd_hooks=hooks, n_tokens=n_tokens)
    if general_prompts is not None:
        row["general_accuracy"] = evaluate(model, general_prompts, fwd_hooks=hooks, condition=name,
                                           seed=seed, n_boot=200).accuracy
    return row


# ---------------------------------------------------------------- the k sweep on the dev split


@dataclass(frozen=True)
class KSweep:
    """Dev accuracy for each k and the cost to general ability. The chosen k is the best feasible k
    (within every bound: perplexity increase and/or accuracy drop on general prompts) if it beats the
    unpruned model's dev accuracy, else 0: pruning nothing is a possible outcome, and `why` says so.

    Beside the choice, what the sweep says without its bound: `smallest_unbounded_k` and
    `best_unbounded_k` (never the method's choice; what it would prune if the bound were lifted)."""

    rows: tuple[dict[str, Any], ...]
    baseline: dict[str, Any]
    chosen_k: int
    mode: str
    max_ppl_increase: float | None
    text: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    max_general_drop: float | None = None
    why: str = ""

    @property
    def ks(self) -> list[int]:
        return [r["k"] for r in self.rows]

    @property
    def best_pruned_k(self) -> int | None:
        """The feasible k > 0 with the best dev accuracy (the smallest on ties), better than k = 0 or not."""
        best = _best_feasible(self.rows)
        return None if best is None else best["k"]

    @property
    def smallest_unbounded_k(self) -> int | None:
        """The smallest k whose dev accuracy beats no pruning when the bound on general ability is
        ignored; None when no k does."""
        better = [r["k"] for r in self.rows if r["dev_accuracy"] > self.baseline["dev_accuracy"]]
        return min(better) if better else None

    @property
    def best_unbounded_k(self) -> int | None:
        """The k with the best dev accuracy (the smallest on ties) among those that beat no pruning,
        the bound on general ability ignored; None when no k does."""
        better = [r for r in self.rows if r["dev_accuracy"] > self.baseline["dev_accuracy"]]
        return max(better, key=lambda r: (r["dev_accuracy"], -r["k"]))["k"] if better else None

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "baseline": self.baseline, "chosen_k": self.chosen_k, "why": self.why,
                "mode": self.mode, "max_ppl_increase": self.max_ppl_increase, "text": self.text,
                "max_general_drop": self.max_general_drop, **self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "KSweep":
        own = ("rows", "baseline", "chosen_k", "why", "mode", "max_ppl_increase", "text", "max_general_drop")
        return cls(tuple(obj["rows"]), obj["baseline"], obj["chosen_k"], obj["mode"], obj["max_ppl_increase"],
                   obj["text"], {k: v for k, v in obj.items() if k not in own}, obj.get("max_general_drop"),
                   obj.get("why", ""))


def _best_feasible(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep row within every bound with the best dev accuracy (the smallest k on ties), or None."""
    feasible = [r for r in rows if r["feasible"]]
    return max(feasible, key=lambda r: (r["dev_accuracy"], -r["k"])) if feasible else None


def _choose_k(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> tuple[int, str]:
    """(chosen k, why k = 0 when it is): the best feasible k only if it beats no pruning on the dev split."""
    best = _best_feasible(rows)
    if best is None:
        return 0, f"no k in {[r['k'] for r in rows]} stays within the bound on general ability"
    if best["dev_accuracy"] > baseline["dev_accuracy"]:
        return best["k"], ""
    return 0, (f"no k improves dev accuracy over the unpruned model ({baseline['dev_accuracy']:.3f}; "
               f"best pruned: k = {best['k']}, {best['dev_accuracy']:.3f})")


def valid_ks(model: HookedModel, ks: Sequence[int], mode: str = "global", kind: str = "neuron",
             strict: bool = False) -> list[int]:
    """The k of the grid that `mode` can select on this model among its components of `kind` (sorted);
    an error if none can, and with `strict` (a grid the user gave, not the default one) an error naming
    `ks` if any k cannot."""
    kinds = component_kind(kind)
    width = kinds.width(model)
    most = width if mode == "per-layer" else width * model.cfg.n_layers
    valid = sorted({int(k) for k in ks if 0 < k <= most})
    beyond = sorted({int(k) for k in ks if not 0 < k <= most})
    if not valid or (strict and beyond):
        raise FieldError("ks", f"{','.join(map(str, beyond))}: {mode} top-k on this model can select 1 <= k <= "
                               f"{most} ({kinds.plural + ' per layer' if mode == 'per-layer' else kinds.plural}); drop "
                               f"{'it' if len(beyond) == 1 else 'them'} from the grid")
    return valid


def sweep_k(model: HookedModel, scores: CopyScores, dev_prompts: Sequence, ks: Sequence[int] = DEFAULT_KS,
            mode: str = "global", max_ppl_increase: float | None = 0.05, text: str | None = None,
            text_name: str = "pydoc_data.topics", n_tokens: int = 4096, seed: int = 0,
            progress: bool = False, general_prompts: Sequence | None = None,
            max_general_drop: float = 0.05) -> KSweep:
    """For each k: dev accuracy under pruning and its cost to general ability; k = 0 (no pruning)
    is the baseline every k must beat (`KSweep.chosen_k`).

    The cost is the relative perplexity increase on held-out text (bound `max_ppl_increase`; None
    skips it), and, with `general_prompts`, the accuracy drop on those prompts (bound
    `max_general_drop`): the bound for models that read no English, such as the model organisms.
    """
    if not dev_prompts:
        raise ValueError("the k sweep needs dev prompts (the probe's dev split)")
    if max_ppl_increase is None and general_prompts is None:
        raise ValueError("the k sweep needs a bound: max_ppl_increase and/or general_prompts")
    scores.check(model)
    ks = valid_ks(model, ks, mode, scores.kind)

    def measure(hooks, name: str) -> dict[str, Any]:
        return _measure(model, dev_prompts, hooks, name, seed, text, n_tokens, max_ppl_increase is not None,
                        general_prompts)

    baseline = {"k": 0, "n_neurons": 0, **measure([], "unpruned")}
    rows = []
    for k in tqdm(ks, desc="k sweep", disable=not progress):
        ns = select(scores, mode, k=k)
        row = {"k": k, "n_neurons": len(ns), **measure(pruning_hooks(model, ns), f"k={k}")}
        feasible = True
        if max_ppl_increase is not None:
            row["ppl_increase"] = row["ppl"] / baseline["ppl"] - 1.0
            feasible &= row["ppl_increase"] <= max_ppl_increase
        if general_prompts is not None:
            row["general_drop"] = baseline["general_accuracy"] - row["general_accuracy"]
            feasible &= row["general_accuracy"] >= baseline["general_accuracy"] - max_general_drop
        rows.append({**row, "feasible": feasible})
    if max_ppl_increase is not None:
        baseline["ppl_increase"] = 0.0
    chosen, why = _choose_k(rows, baseline)
    meta: dict[str, Any] = {"n_dev": len(dev_prompts), "seed": seed, "model": model_fingerprint(model)}
    if max_ppl_increase is not None:
        meta["n_tokens"] = n_tokens
    if general_prompts is not None:
        meta["n_general"] = len(general_prompts)
    return KSweep(tuple(rows), baseline, chosen, mode, max_ppl_increase,
                  text_name if max_ppl_increase is not None else None, meta,
                  max_general_drop if general_prompts is not None else None, why)


# ---------------------------------------------------------------- one layer, a percentage of its neurons


@dataclass(frozen=True)
class LayerPercentSweep:
    """Dev accuracy of every (layer, percent) single-layer selection; the chosen one maximises dev
    accuracy (ties: fewer neurons, then the lower layer) among rows within the perplexity bound."""

    rows: tuple[dict[str, Any], ...]
    baseline: dict[str, Any]
    chosen_layer: int | None
    chosen_percent: float | None
    max_ppl_increase: float | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "baseline": self.baseline, "chosen_layer": self.chosen_layer,
                "chosen_percent": self.chosen_percent, "max_ppl_increase": self.max_ppl_increase, **self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LayerPercentSweep":
        own = ("rows", "baseline", "chosen_layer", "chosen_percent", "max_ppl_increase")
        return cls(tuple(obj["rows"]), obj["baseline"], obj["chosen_layer"], obj["chosen_percent"],
                   obj["max_ppl_increase"], {k: v for k, v in obj.items() if k not in own})


def sweep_layer_percent(model: HookedModel, scores: CopyScores, dev_prompts: Sequence,
                        percents: Sequence[float] = (1, 2, 5, 10), layers: Sequence[int] | None = None,
                        max_ppl_increase: float | None = None, text: str | None = None, n_tokens: int = 4096,
                        seed: int = 0, progress: bool = False) -> LayerPercentSweep:
    """Single-layer x percentage selection on the probe's dev split: `select_layer_percent` for every
    allowed layer (or `layers`) and percent, scored by dev accuracy, optionally bounded by the relative
    perplexity increase on held-out text (`max_ppl_increase`; None skips perplexity)."""
    if not dev_prompts:
        raise ValueError("the layer-percent sweep needs dev prompts (the probe's dev split)")
    scores.check(model)
    allowed = range(scores.scores.shape[0]) if scores.allowed_layers is None else scores.allowed_layers
    layers = sorted(allowed if layers is None else layers)

    def measure(hooks, name: str) -> dict[str, Any]:
        return _measure(model, dev_prompts, hooks, name, seed, text, n_tokens, max_ppl_increase is not None)

    baseline = {"n_neurons": 0, **measure([], "unpruned")}
    rows = []
    grid = [(l, pc) for l in layers for pc in percents]
    for layer, percent in tqdm(grid, desc="layer x percent", disable=not progress):
        ns = select_layer_percent(scores, layer, percent)
        row = {"layer": layer, "percent": percent, "n_neurons": len(ns),
               **measure(pruning_hooks(model, ns), f"layer={layer},p={percent}")}
        if max_ppl_increase is not None:
            row["ppl_increase"] = row["ppl"] / baseline["ppl"] - 1.0
        rows.append({**row, "feasible": max_ppl_increase is None or row["ppl_increase"] <= max_ppl_increase})
    feasible = [r for r in rows if r["feasible"]]
    best = max(feasible, key=lambda r: (r["dev_accuracy"], -r["n_neurons"], -r["layer"]), default=None)
    return LayerPercentSweep(tuple(rows), baseline, None if best is None else best["layer"],
                             None if best is None else best["percent"], max_ppl_increase,
                             {"n_dev": len(dev_prompts), "seed": seed, "model": model_fingerprint(model)})
