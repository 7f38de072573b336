"""The copy-neuron method as pure, typed steps, configured by one `FindConfig`:

    prompts(tokenizer, config)                         -> Probe        the probe's splits
    attribute(model, probe.attribution, config)        -> Attributions (registry ATTRIBUTIONS)
    score(model, attributions, config)                 -> CopyScores   normalised, gated
    choose_k(model, scores, probe.dev, config)         -> KSweep       dev sweep under the bound
    decide(model, scores, sweep, probe.attribution, config) -> Choice  the guard; the chosen set

Each step reads and writes no files. `find.find_copy_neurons` wraps them with checkpoints and a
neuron file; the main job (`reproduce`), the replication study (`analyses/replication.py`, one
`FindConfig` per variant) and the model organisms (`organisms.method`, their own `FindConfig`) call
the same steps: their differences are configs. A new attribution method is one function
`fn(model, prompts, config, progress) -> Attributions` and one entry in `ATTRIBUTIONS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from mechcopy.arch import HookedModel
from mechcopy.attribution import (MAX_COMPLETENESS_ERROR, METHODS, NORMALISATIONS, RULES, TARGETS, Attributions,
                                  CopyScores, copy_scores, grad_x_act, integrated_gradients)
from mechcopy.audit import SelfConsistency, self_consistency
from mechcopy.components import MATCHES, Components
from mechcopy.errors import Above, check_minimums, input_file
from mechcopy.io import as_tuples
from mechcopy.selection import select
from mechcopy.sweeps import KSweep, default_ks, sweep_k
from mechcopy.tasks.probe import FORMATS, ITEM_SETS, ProbeConfig, build_probe, probe_splits
from mechcopy.tasks.prompts import ICLPrompt

PROBES = ("classic", "balanced")
SELECTIONS = ("global", "per-layer")


# ---------------------------------------------------------------- attribution methods

Attributor = Callable[[HookedModel, Sequence[ICLPrompt], "FindConfig", bool], Attributions]


def _ig(model: HookedModel, prompts: Sequence[ICLPrompt], config: "FindConfig", progress: bool) -> Attributions:
    return integrated_gradients(model, prompts, target=config.target, steps=config.steps, method=config.method,
                                rule=config.rule, batch_size=config.batch_size, progress=progress)


def _gradxact(model: HookedModel, prompts: Sequence[ICLPrompt], config: "FindConfig", progress: bool) -> Attributions:
    return grad_x_act(model, prompts, target=config.target, method=config.method, batch_size=config.batch_size,
                      progress=progress)


def _head_ig(model: HookedModel, prompts: Sequence[ICLPrompt], config: "FindConfig", progress: bool) -> Attributions:
    from mechcopy.head_attribution import head_integrated_gradients

    return head_integrated_gradients(model, prompts, target=config.target, steps=config.steps, method=config.method,
                                     rule=config.rule, progress=progress)


def _head_gradxact(model: HookedModel, prompts: Sequence[ICLPrompt], config: "FindConfig",
                   progress: bool) -> Attributions:
    from mechcopy.head_attribution import head_grad_x_act

    return head_grad_x_act(model, prompts, target=config.target, method=config.method, progress=progress)


#: attribution method name -> function; `FindConfig.attribution` names one
ATTRIBUTIONS: dict[str, Attributor] = {"ig": _ig, "gradxact": _gradxact}
#: the same methods over attention heads (`mechcopy.head_attribution`: each head's output `z` at the last
#: position scaled from zero), for `FindConfig.components="heads"`
HEAD_ATTRIBUTIONS: dict[str, Attributor] = {"ig": _head_ig, "gradxact": _head_gradxact}
#: `FindConfig.components` -> (component kind, its attribution methods)
COMPONENTS: dict[str, tuple[str, dict[str, Attributor]]] = {"neurons": ("neuron", ATTRIBUTIONS),
                                                            "heads": ("head", HEAD_ATTRIBUTIONS)}


# ---------------------------------------------------------------- the config


@dataclass(frozen=True)
class FindConfig:
    """Every setting of the method (the `mechcopy find` flags have the same names)."""

    n: int = 200                    # probe prompts for attribution
    n_dev: int = 50                 # probe dev prompts for the k sweep
    shots: int = 4                  # demonstrations per probe prompt
    steps: int = 20                 # IG integration steps
    attribution: str = "ig"         # a key of ATTRIBUTIONS: ig | gradxact
    target: str = "contrast"
    method: str = "fast"            # fast | reference
    batch_size: int = 1             # prompts per batch of IG rows on the fast path (1 suits a CPU)
    rule: str = "gauss-legendre"
    normalisation: str = "minmax"
    mode: str = "global"            # global | per-layer top-k
    ks: tuple[int, ...] | None = None   # the k grid (default sweeps.default_ks(kind): DEFAULT_KS, HEAD_KS)
    max_ppl_increase: float | None = 0.05   # the bound on general ability (None: no perplexity bound)
    text: str | None = None         # held-out text file for perplexity (default pydoc_data.topics)
    ppl_tokens: int = 4096
    max_general_drop: float = 0.05  # with general prompts (`choose_k`): the bound on their accuracy drop
    seed: int = 0
    checkpoint_every: int = 10
    # the three below are what docs/replication.md supports: without the gate, IG's unconverged layer 0
    # dominated the selection and pruning it raised the very target it was chosen to lower
    max_completeness_error: float | None = MAX_COMPLETENESS_ERROR  # IG gate: select only in layers whose median error is below it
    consistency_random: int = 3     # > 0: refuse (k = 0) a choice that fails audit.self_consistency
    random_match: str = "layer"     # the guard's random sets: matched on layer, or on layer and size (components.MATCHES)
    probe: str = "balanced"         # balanced (uniform gold, distinct demo labels) | classic (labels as they fall)
    probe_items: str = "mixed"      # balanced probe: words | places | people | names | mixed
    probe_format: str = "newline"   # balanced probe: newline ("x -> y" per line) | comma (one line)
    components: str = "neurons"     # what is attributed and pruned: neurons | heads (attention heads, `hook_z`)

    MINIMUM: ClassVar[dict[str, int | float]] = {
        "n": 1, "n_dev": 1, "shots": 1, "steps": 1, "ks": 1, "max_ppl_increase": 0.0, "ppl_tokens": 2, "seed": 0,
        "checkpoint_every": 1, "max_completeness_error": Above(0.0), "consistency_random": 0, "batch_size": 1,
        "max_general_drop": 0.0}

    def __post_init__(self):
        for name, allowed in (("attribution", tuple(ATTRIBUTIONS)), ("target", TARGETS), ("method", METHODS),
                              ("rule", RULES), ("normalisation", NORMALISATIONS), ("mode", SELECTIONS),
                              ("probe", PROBES), ("probe_items", ITEM_SETS), ("probe_format", tuple(FORMATS)),
                              ("random_match", MATCHES), ("components", tuple(COMPONENTS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if isinstance(self.ks, list):
            object.__setattr__(self, "ks", tuple(self.ks))
        check_minimums(self)
        if self.components == "heads" and self.mode == "per-layer" and self.ks is None:
            raise ValueError("per-layer top-k over heads needs its own k grid (--ks), each k at most the heads "
                             "per layer")
        if self.text is not None and not input_file(self.text, "text file").stat().st_size:
            raise ValueError(f"text file {self.text} is empty")


    @property
    def kind(self) -> str:
        """The component kind attributed and pruned (`components.KINDS`): `neuron` or `head`."""
        return COMPONENTS[self.components][0]

    @property
    def grid(self) -> tuple[int, ...]:
        """The k grid of the sweep: `ks`, or the kind's default (`sweeps.default_ks`)."""
        return tuple(self.ks) if self.ks else default_ks(self.kind)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FindConfig":
        """The config `to_json` wrote (settings this version no longer has are refused, not dropped)."""
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown FindConfig settings {unknown}: written by another version of mechcopy")
        return cls(**{k: as_tuples(v) for k, v in obj.items()})


# ---------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Probe:
    """The probe's prompts, disjoint by query item: attribution (attributed and scored; the guard's
    check), dev (k is chosen on it) and test (held out; empty unless asked for)."""

    attribution: tuple[ICLPrompt, ...]
    dev: tuple[ICLPrompt, ...]
    test: tuple[ICLPrompt, ...] = ()


def prompts(tokenizer, config: FindConfig, n_test: int = 0) -> Probe:
    """The probe `config` names, `config.n` attribution and `config.n_dev` dev prompts (and `n_test`
    test prompts, drawn after them, so asking for them changes neither of the first two)."""
    if config.probe == "classic":
        attr, rest = probe_splits(tokenizer, n_attr=config.n, n_dev=config.n_dev + n_test, shots=config.shots,
                                  seed=config.seed)
        return Probe(tuple(attr), tuple(rest[:config.n_dev]), tuple(rest[config.n_dev:]))
    probe = ProbeConfig(items=config.probe_items, template=config.probe_format, shots=config.shots)
    splits = build_probe(tokenizer, probe, n_attr=config.n, n_dev=config.n_dev, n_test=n_test, seed=config.seed)
    return Probe(splits.attribution, splits.dev, splits.test)


def attribute(model: HookedModel, prompts: Sequence[ICLPrompt], config: FindConfig,
              progress: bool = False) -> Attributions:
    """Per-prompt attributions of every component of `config.components` by `config.attribution`
    (`ATTRIBUTIONS` for neurons, `HEAD_ATTRIBUTIONS` for heads)."""
    return COMPONENTS[config.components][1][config.attribution](model, prompts, config, progress)


def score(model: HookedModel, attributions: Attributions, config: FindConfig,
          prompts: Sequence[ICLPrompt] | None = None) -> CopyScores:
    """Copy scores: `config.normalisation` per prompt, the mean over prompts, and only the layers whose
    IG converged allowed (`config.max_completeness_error`; None allows all). `prompts` are recorded."""
    return copy_scores(model, attributions, config.normalisation, prompts=prompts, seed=config.seed,
                       max_completeness_error=config.max_completeness_error, shots=config.shots, kind=config.kind)


def held_out_text(config: FindConfig) -> tuple[str | None, str]:
    """The perplexity text of `config` and its name (None: the default, `pydoc_data.topics`)."""
    if config.text is None:
        return None, "pydoc_data.topics"
    try:
        return Path(config.text).read_text(encoding="utf-8"), str(config.text)
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {config.text} is not UTF-8 text ({e})") from e


def choose_k(model: HookedModel, scores: CopyScores, dev: Sequence[ICLPrompt], config: FindConfig,
             progress: bool = False, general_prompts: Sequence[ICLPrompt] | None = None) -> KSweep:
    """The k sweep on the dev split over `config.ks`, bounded by `config.max_ppl_increase` on held-out
    text and, with `general_prompts`, by `config.max_general_drop` on them (`sweeps.sweep_k`)."""
    text, text_name = held_out_text(config)
    return sweep_k(model, scores, dev, config.grid, config.mode, config.max_ppl_increase, text,
                   text_name, config.ppl_tokens, config.seed, progress, general_prompts, config.max_general_drop)


@dataclass(frozen=True)
class Guard:
    """The self-consistency check of a chosen k on the attribution prompts, and why it refused (empty
    when it passed): pruning the chosen set must move the target away from copying more than random sets."""

    check: SelfConsistency
    refused: str = ""

    @property
    def passed(self) -> bool:
        return not self.refused

    def to_json(self) -> dict[str, Any]:
        return {"self_consistency": self.check.to_json(), **({"refused": self.refused} if self.refused else {})}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Guard":
        """The guard as `to_json` wrote it (also from a neuron file's meta, which holds the same keys)."""
        return cls(SelfConsistency.from_json(obj["self_consistency"]), obj.get("refused", ""))


def guard(model: HookedModel, prompts: Sequence[ICLPrompt], scores: CopyScores, k: int, config: FindConfig) -> Guard:
    """`audit.self_consistency` of the top-k set with `config.consistency_random` random sets (matched
    as `config.random_match` says); refused when chosen - random does not move the target away from
    copying."""
    check = self_consistency(model, prompts, scores, [k], config.mode, config.target, config.consistency_random,
                             config.seed, match=config.random_match)
    if check.passed:
        return Guard(check)
    row = check.rows[0].chosen_vs_random
    return Guard(check, f"the top-{k} set fails the self-consistency check on the attribution prompts: "
                        f"{config.target} chosen - random = {row.diff:+.3f} [{row.ci[0]:+.3f}, {row.ci[1]:+.3f}]; "
                        "k = 0 (nothing pruned)")


@dataclass(frozen=True)
class Choice:
    """The method's answer: the chosen set (empty when k = 0, with the reason in its meta `why`), the
    sweep it came from and the guard's verdict (None when the guard did not run)."""

    components: Components
    sweep: KSweep
    guard: Guard | None = None

    @property
    def k(self) -> int:
        return len(self.components)

    @classmethod
    def from_components(cls, components: Components) -> "Choice":
        """The choice a neuron file of `mechcopy find` records: its set, and its meta's sweep and guard."""
        meta = components.meta
        if "sweep" not in meta:
            where = f" {components.source}" if components.source else ""
            raise ValueError(f"the component file{where} records no k sweep: it was not written by `mechcopy find`")
        guard = Guard.from_json(meta) if "self_consistency" in meta else None
        return cls(components, KSweep.from_json(meta["sweep"]), guard)


def decide(model: HookedModel, scores: CopyScores, sweep: KSweep, attribution: Sequence[ICLPrompt],
           config: FindConfig) -> Choice:
    """The sweep's k, selected (`config.mode`) and checked by the guard on the attribution prompts
    (`config.consistency_random` > 0); k = 0 when the sweep or the guard says so."""
    if not sweep.chosen_k:
        empty = Components((), scores.model, {"selection": config.mode, "k": 0, "threshold": None, "n": 0,
                                              "why": sweep.why}, kind=scores.kind)
        return Choice(empty, sweep)
    chosen = select(scores, config.mode, k=sweep.chosen_k)
    if config.consistency_random <= 0:
        return Choice(chosen, sweep)
    verdict = guard(model, attribution, scores, sweep.chosen_k, config)
    if not verdict.passed:
        chosen = Components((), chosen.model, {**chosen.meta, "k": 0, "n": 0, "why": verdict.refused}, kind=chosen.kind)
    return Choice(chosen, sweep, verdict)


def evaluated(chosen: Components, sweep: KSweep, scores: CopyScores | None, mode: str = "global") -> Components:
    """The set an evaluation of the method prunes: the method's choice; when it chose k = 0, the sweep's
    `smallest_unbounded_k` (the smallest k that beats no pruning on the dev split with the bound on
    general ability lifted: said so in meta `basis`, never presented as the method's choice); empty
    when no k beats no pruning at all."""
    if chosen.pairs:
        return Components(chosen.pairs, chosen.model, {**chosen.meta, "basis": "chosen on the probe's dev split"},
                          kind=chosen.kind)
    k = sweep.smallest_unbounded_k
    if k is None:
        return Components((), chosen.model, {**chosen.meta, "basis": f"nothing to prune: {chosen.why_empty}"},
                          kind=chosen.kind)
    if scores is None:
        raise ValueError("the fallback set needs the copy scores the sweep selected from")
    fallback = select(scores, mode, k=k)
    basis = (f"not the method's choice: find chose k = 0 ({chosen.why_empty}); k = {k} is the smallest k that "
             "beats no pruning on the dev split when the bound on general ability is lifted")
    return Components(fallback.pairs, chosen.model, {**fallback.meta, "scores_path": chosen.meta["scores_path"],
                                                     "sweep": sweep.to_json(), "basis": basis}, kind=chosen.kind)
