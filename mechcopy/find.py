"""`mechcopy find`: the method's steps (`mechcopy.method`: probe -> attribution -> copy scores -> k
chosen on the probe's dev split -> the guard) with files, checkpoints and resumption around them.

`find_copy_neurons(model, out, FindConfig(...))` writes three files beside each other: the neuron
file `out` (JSON), the copy scores (`<out>.scores.safetensors` + `.json`) and the per-prompt
attributions (`<out>.attributions.safetensors`). The attributions are saved every
`checkpoint_every` prompts, so an interrupted run started again with the same settings resumes
where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from mechcopy import method
from mechcopy.arch import HookedModel
from mechcopy.attribution import Attributions
from mechcopy.components import Components
from mechcopy.errors import note
from mechcopy.evaluation import check_context
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import side_file
from mechcopy.method import ATTRIBUTIONS, PROBES, SELECTIONS, FindConfig
from mechcopy.sweeps import valid_ks

CHECKPOINT_FORMAT = 1

__all__ = ["ATTRIBUTIONS", "PROBES", "SELECTIONS", "FindConfig", "find_copy_neurons", "attribute_with_checkpoints"]


def _prompts_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode() + b"\x00" + p.answer.encode() + b"\x01")
    return h.hexdigest()[:16]


def load_checkpoint(checkpoint: Path, identity: dict[str, Any], n_prompts: int) -> Attributions | None:
    """The attributions saved in `checkpoint` if it holds a part of this very run, else None.

    A damaged file or one from other settings is not an error: it is said, then overwritten by the
    first new checkpoint, so a half-written or stale file never blocks `find`.
    """
    if not checkpoint.exists():
        return None
    try:
        done, header = Attributions.load(checkpoint)
    except Exception as e:  # noqa: BLE001 - any damage means the same: start over
        note(f"checkpoint {checkpoint} is damaged ({type(e).__name__}: {e}); attributing from the start")
        return None
    if not all(header.get(k) == v for k, v in identity.items()) or done.values.shape[0] > n_prompts:
        note(f"checkpoint {checkpoint} is from other settings or another model; attributing from the start")
        return None
    note(f"resuming from checkpoint {checkpoint}: {done.values.shape[0]} of {n_prompts} prompts attributed")
    return done


def attribute_with_checkpoints(model: HookedModel, prompts: Sequence, checkpoint: Path, identity: dict[str, Any],
                               config: FindConfig, progress: bool = True) -> Attributions:
    """Attribute `prompts` (`method.attribute`) in chunks of `config.checkpoint_every`, saving after each
    chunk; resume from `checkpoint` when its header matches `identity` (same model, prompts and settings)."""
    done = load_checkpoint(Path(checkpoint), identity, len(prompts))
    parts: list[Attributions] = [done] if done is not None else []
    start = parts[0].values.shape[0] if parts else 0
    every = config.checkpoint_every
    with tqdm(total=len(prompts), initial=start, desc=f"{config.attribution} attribution", disable=not progress) as bar:
        for s in range(start, len(prompts), every):
            chunk = prompts[s:s + every]
            part = method.attribute(model, chunk, config)
            parts = [Attributions.cat(parts + [part])]
            parts[0].save(checkpoint, identity)
            bar.update(len(chunk))
    return Attributions.cat(parts)


def find_copy_neurons(model: HookedModel, out: str | Path, config: FindConfig = FindConfig(),
                      progress: bool = True) -> Components:
    """The method's steps (`mechcopy.method`) with files: writes the neuron file `out`, the scores and the
    attributions (checkpointed as they grow); returns the set.

    Everything that can fail on the inputs (the k grid against the model, the text, the prompts
    against the context) is checked before the attribution starts. If no k beats the unpruned model
    on the dev split, or the guard refuses the k that does, the set is empty and its meta says why
    (`k` = 0 and `why`).
    """
    c = config
    out = Path(out)
    valid_ks(model, c.grid, c.mode, c.kind)
    method.held_out_text(c)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    probe = method.prompts(model.tokenizer, c)
    check_context(model, probe.attribution + probe.dev)
    fp = model_fingerprint(model)
    identity = {"format": CHECKPOINT_FORMAT, "model": fp["name"], "weight_hash": fp["weight_hash"],
                "attribution": c.attribution, "target": c.target, "steps": c.steps,
                "prompts": _prompts_hash(probe.attribution), "n": c.n,
                **({} if c.components == "neurons" else {"components": c.components})}
    att = attribute_with_checkpoints(model, probe.attribution, side_file(out, ".attributions.safetensors"), identity,
                                     c, progress)
    times["attribution_s"] = round(time.perf_counter() - t0, 1)

    scores = method.score(model, att, c, prompts=probe.attribution)
    scores_path = scores.save(side_file(out, ".scores.safetensors"))

    t1 = time.perf_counter()
    sweep = method.choose_k(model, scores, probe.dev, c, progress)
    times["sweep_s"] = round(time.perf_counter() - t1, 1)
    choice = method.decide(model, scores, sweep, probe.attribution, c)
    guard = {} if choice.guard is None else choice.guard.to_json()
    meta = {**guard, **choice.components.meta, "attribution": c.attribution, "target": c.target, "steps": att.steps,
            "method": att.method, "rule": att.rule, "normalisation": c.normalisation, "n_attr": c.n,
            "n_dev": c.n_dev, "shots": c.shots, "seed": c.seed, "scores_path": str(scores_path.resolve()),
            "completeness_error_median": float(att.completeness_error().median()),
            "sweep": sweep.to_json(), "times": times, "config": asdict(c),
            "intervention": {"ablation": "zero", "positions": "all"}}
    neurons = Components(choice.components.pairs, fp, meta, kind=choice.components.kind)
    neurons.meta["layer_counts"] = neurons.layer_counts(model.cfg.n_layers)
    neurons.save(out)
    return neurons
