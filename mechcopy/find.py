"""Finding copy neurons: probe -> neuron attribution -> copy scores -> k chosen on the probe's dev
split -> a neuron file.

`find_copy_neurons(model, out, FindConfig(...))` writes three files beside each other: the neuron
file `out` (JSON), the copy scores (`<out>.scores.safetensors` + `.json`) and the per-prompt
attributions (`<out>.attributions.safetensors`). The attributions are saved every
`checkpoint_every` prompts, so an interrupted run started again with the same settings resumes
where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mechcopy.arch import HookedModel
from mechcopy.attribution import NORMALISATIONS, RULES, TARGETS, Attributions
from mechcopy.neurons import NeuronSet

CHECKPOINT_FORMAT = 1
ATTRIBUTIONS = ("ig", "gradxact")


@dataclass(frozen=True)
class FindConfig:
    """Every setting of `find_copy_neurons` (the `mechcopy find` flags have the same names)."""

    n: int = 200                    # probe prompts for attribution
    n_dev: int = 50                 # probe dev prompts for the k sweep
    shots: int = 4                  # demonstrations per probe prompt
    steps: int = 20                 # IG integration steps
    attribution: str = "ig"         # ig | gradxact
    target: str = "contrast"
    method: str = "fast"            # fast | reference
    batch_size: int = 1             # prompts per batch of IG rows on the fast path (1 suits a CPU)
    rule: str = "gauss-legendre"
    normalisation: str = "minmax"
    mode: str = "global"            # global | per-layer top-k
    ks: tuple[int, ...] | None = None   # the k grid (default pruning.DEFAULT_KS)
    max_ppl_increase: float = 0.05
    text: str | None = None         # held-out text file for perplexity (default pydoc_data.topics)
    ppl_tokens: int = 4096
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self):
        for name, allowed in (("attribution", ATTRIBUTIONS), ("target", TARGETS), ("rule", RULES),
                              ("normalisation", NORMALISATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.ks is not None:
            object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))


def side_file(out: str | Path, suffix: str) -> Path:
    """`neurons.json` -> `neurons<suffix>` (the scores and attributions live beside the neuron file)."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".json") else out.name
    return out.with_name(stem + suffix)


def _prompts_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode() + b"\x00" + p.answer.encode() + b"\x01")
    return h.hexdigest()[:16]


def attribute_with_checkpoints(model: HookedModel, prompts: Sequence, checkpoint: Path, identity: dict[str, Any],
                               config: FindConfig, progress: bool = True) -> Attributions:
    """Attribute `prompts` in chunks of `config.checkpoint_every`, saving after each chunk; resume from
    `checkpoint` when its header matches `identity` (same model, prompts and settings)."""
    from tqdm.auto import tqdm

    from mechcopy.attribution import grad_x_act, integrated_gradients

    parts: list[Attributions] = []
    if Path(checkpoint).exists():
        done, header = Attributions.load(checkpoint)
        if all(header.get(k) == v for k, v in identity.items()):
            parts = [done]
    start = parts[0].values.shape[0] if parts else 0
    every = config.checkpoint_every
    bar = tqdm(total=len(prompts), initial=start, desc=f"{config.attribution} attribution", disable=not progress)
    for s in range(start, len(prompts), every):
        chunk = prompts[s:s + every]
        if config.attribution == "ig":
            part = integrated_gradients(model, chunk, target=config.target, steps=config.steps,
                                        method=config.method, rule=config.rule, batch_size=config.batch_size)
        else:
            part = grad_x_act(model, chunk, target=config.target, method=config.method,
                              batch_size=config.batch_size)
        parts = [Attributions.cat(parts + [part])]
        parts[0].save(checkpoint, identity)
        bar.update(len(chunk))
    bar.close()
    return Attributions.cat(parts)


def find_copy_neurons(model: HookedModel, out: str | Path, config: FindConfig = FindConfig(),
                      progress: bool = True) -> NeuronSet:
    """The whole pipeline; writes the neuron file `out`, the scores and the attributions; returns the set."""
    from mechcopy.attribution import copy_scores
    from mechcopy.neurons import model_fingerprint
    from mechcopy.pruning import DEFAULT_KS, select, sweep_k
    from mechcopy.tasks.probe import probe_splits

    c = config
    out = Path(out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    attr_prompts, dev_prompts = probe_splits(model.tokenizer, n_attr=c.n, n_dev=c.n_dev, k=c.shots, seed=c.seed)
    fp = model_fingerprint(model)
    identity = {"format": CHECKPOINT_FORMAT, "model": fp["name"], "weight_hash": fp["weight_hash"],
                "attribution": c.attribution, "target": c.target, "steps": c.steps if c.attribution == "ig" else 1,
                "prompts": _prompts_hash(attr_prompts), "n": c.n}
    att = attribute_with_checkpoints(model, attr_prompts, side_file(out, ".attributions.safetensors"), identity,
                                     c, progress)
    times["attribution_s"] = round(time.perf_counter() - t0, 1)

    scores = copy_scores(model, att, c.normalisation, prompts=attr_prompts, seed=c.seed, shots=c.shots)
    scores_path = scores.save(side_file(out, ".scores.safetensors"))

    t1 = time.perf_counter()
    text, text_name = None, "pydoc_data.topics"
    if c.text is not None:
        text, text_name = Path(c.text).read_text(), str(c.text)
    sweep = sweep_k(model, scores, dev_prompts, c.ks or DEFAULT_KS, c.mode, c.max_ppl_increase, text, text_name,
                    c.ppl_tokens, c.seed, progress)
    times["sweep_s"] = round(time.perf_counter() - t1, 1)
    if sweep.chosen_k is None:
        raise RuntimeError(
            f"no k in {[r['k'] for r in sweep.rows]} keeps the perplexity increase within "
            f"{c.max_ppl_increase:.0%} (smallest increase {min(r['ppl_increase'] for r in sweep.rows):.1%}); "
            "pass smaller --ks or a larger --max-ppl-increase")
    chosen = select(scores, c.mode, k=sweep.chosen_k)
    meta = {**chosen.meta, "attribution": c.attribution, "target": c.target, "steps": identity["steps"],
            "method": att.method, "rule": att.rule, "normalisation": c.normalisation, "n_attr": c.n,
            "n_dev": c.n_dev, "shots": c.shots, "seed": c.seed, "scores_path": str(scores_path.resolve()),
            "completeness_error_median": float(att.completeness_error().median()),
            "sweep": sweep.to_json(), "times": times, "layer_counts": chosen.layer_counts(model.cfg.n_layers),
            "config": asdict(c)}
    neurons = NeuronSet(chosen.neurons, fp, meta)
    neurons.save(out)
    return neurons
