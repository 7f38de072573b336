"""`mechcopy find`: the method's steps (`mechcopy.method`: probe -> attribution -> copy scores -> k
chosen on the probe's dev split -> the guard) with files, checkpoints and resumption around them.

`find_copy_neurons(model, out, FindConfig(...))` writes a set of files beside each other: the neuron
file `out` (JSON), the copy scores (`<out>.scores.safetensors` + `.json`) and the per-prompt
attributions (`<out>.attributions.safetensors`). While it runs, the attributions are saved every
`checkpoint_every` prompts to `<out>.partial.safetensors`, so an interrupted run started again with
the same settings resumes where it stopped; the checkpoint's identity holds everything that changes
a number (the model, its dtype and device kind, the prompts, every attribution setting), and a
checkpoint of other settings is said (which file, what differs) and replaced. The finished set is
written beside the old one under temporary names, then swapped in, the neuron file last, so a run
stopped at any moment leaves the previous set whole; its files carry one run id (meta `run`), so a
set that was swapped only in part is refused where it is read (`conditions.find_scores`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from mechcopy import method
from mechcopy.arch import HookedModel
from mechcopy.attribution import Attributions, CopyScores
from mechcopy.components import Components
from mechcopy.errors import note
from mechcopy.evaluation import check_context, held_out_ids
from mechcopy.fingerprint import model_fingerprint, numerics
from mechcopy.io import side_file
from mechcopy.method import ATTRIBUTIONS, PROBES, SELECTIONS, FindConfig
from mechcopy.progress import tqdm
from mechcopy.sweeps import valid_ks

CHECKPOINT_FORMAT = 2
#: the in-progress checkpoint beside `out` (the finished attributions are `.attributions.safetensors`)
CHECKPOINT_SUFFIX = ".partial.safetensors"
#: the files of a finished run, swapped in in this order (the neuron file itself last)
SET_SUFFIXES = (".attributions.safetensors", ".scores.safetensors", ".scores.json")
#: the FindConfig fields that change the attributions (the rest act after them, on the scores)
ATTRIBUTION_FIELDS = ("n", "shots", "seed", "probe", "probe_items", "probe_format", "attribution", "target", "steps",
                      "method", "rule", "batch_size", "components")

__all__ = ["ATTRIBUTIONS", "PROBES", "SELECTIONS", "FindConfig", "find_copy_neurons", "attribute_with_checkpoints",
           "checkpoint_identity"]


def _prompts_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode() + b"\x00" + p.answer.encode() + b"\x01")
    return h.hexdigest()[:16]


def checkpoint_identity(model: HookedModel, prompts: Sequence, config: FindConfig) -> dict[str, Any]:
    """Everything an attribution checkpoint's numbers depend on: the model (weights, dtype, device
    kind), the prompts and every attribution setting of `config`."""
    fp = model_fingerprint(model)
    return {"format": CHECKPOINT_FORMAT, "model": fp["name"], "weight_hash": fp["weight_hash"], **numerics(model),
            "prompts": _prompts_hash(prompts), **{f: getattr(config, f) for f in ATTRIBUTION_FIELDS}}


def _differences(header: dict[str, Any], identity: dict[str, Any]) -> str:
    diff = [f"{k} {header.get(k, 'unrecorded')!r} here, {v!r} now" for k, v in identity.items() if header.get(k) != v]
    return "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")


def load_checkpoint(checkpoint: Path, identity: dict[str, Any], n_prompts: int) -> Attributions | None:
    """The attributions saved in `checkpoint` if it holds a part of this very run, else None.

    A damaged file or one from other settings is not an error: it is said (the file, and what
    differs), then replaced by the first new checkpoint, so a half-written or stale file never blocks
    `find`.
    """
    if not checkpoint.exists():
        return None
    try:
        done, header = Attributions.load(checkpoint)
    except Exception as e:  # noqa: BLE001 - any damage means the same: start over
        note(f"checkpoint {checkpoint} is damaged ({type(e).__name__}: {e}); attributing from the start "
             "(it is replaced by the first new checkpoint)")
        return None
    if any(header.get(k) != v for k, v in identity.items()) or done.values.shape[0] > n_prompts:
        note(f"checkpoint {checkpoint} holds {done.values.shape[0]} prompts attributed with other settings "
             f"({_differences(header, identity) or 'more prompts than this run has'}); attributing from the start "
             "(it is replaced by the first new checkpoint)")
        return None
    note(f"resuming from checkpoint {checkpoint}: {done.values.shape[0]} of {n_prompts} prompts attributed")
    return done


def attribute_with_checkpoints(model: HookedModel, prompts: Sequence, checkpoint: Path, identity: dict[str, Any],
                               config: FindConfig, progress: bool = True) -> Attributions:
    """Attribute `prompts` (`method.attribute`) in chunks of `config.checkpoint_every`, saving after each
    chunk; resume from `checkpoint` when its header matches `identity` (`checkpoint_identity`)."""
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


def _staging(out: Path) -> Path:
    """The folder beside `out` where a run's set is written before it is swapped in."""
    return out.with_name(f".{out.name}.staging")


def _swap_in(staged: dict[Path, Path]) -> None:
    """Move each staged file over its final path (same folder, so each move is atomic), in order."""
    for src, dst in staged.items():
        os.replace(src, dst)


def find_copy_neurons(model: HookedModel, out: str | Path, config: FindConfig = FindConfig(),
                      progress: bool = True) -> Components:
    """The method's steps (`mechcopy.method`) with files: writes the neuron file `out`, the scores and the
    attributions (checkpointed as they grow, then swapped in as one set); returns the set.

    Everything that can fail on the inputs (the k grid against the model, the held-out text against
    `ppl_tokens`, the prompts against the context) is checked before the attribution starts. If no k
    beats the unpruned model on the dev split, or the guard refuses the k that does, the set is empty
    and its meta says why (`k` = 0 and `why`).
    """
    c = config
    if not isinstance(c, FindConfig):
        raise TypeError(f"config must be a FindConfig, got {type(c).__name__}")
    out = Path(out)
    valid_ks(model, c.grid, c.mode, c.kind, strict=c.ks is not None)
    text, text_name = method.held_out_text(c)
    if c.max_ppl_increase is not None:
        held_out_ids(model.tokenizer, text, c.ppl_tokens, text_name, field="ppl_tokens")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    probe = method.prompts(model.tokenizer, c)
    check_context(model, probe.attribution + probe.dev)
    fp = model_fingerprint(model)
    identity = checkpoint_identity(model, probe.attribution, c)
    checkpoint = side_file(out, CHECKPOINT_SUFFIX)
    att = attribute_with_checkpoints(model, probe.attribution, checkpoint, identity, c, progress)
    times["attribution_s"] = round(time.perf_counter() - t0, 1)

    run = uuid.uuid4().hex[:16]
    staging = _staging(out)
    shutil.rmtree(staging, ignore_errors=True)          # a set an earlier run left half-written
    staging.mkdir(parents=True)
    final = {suffix: side_file(out, suffix) for suffix in SET_SUFFIXES}
    scores = method.score(model, att, c, prompts=probe.attribution)
    scores = CopyScores(scores.scores, {**scores.meta, "run": run}, scores.allowed_layers)
    scores.save(staging / final[".scores.safetensors"].name)
    att.save(staging / final[".attributions.safetensors"].name, {**identity, "run": run})

    t1 = time.perf_counter()
    sweep = method.choose_k(model, scores, probe.dev, c, progress)
    times["sweep_s"] = round(time.perf_counter() - t1, 1)
    choice = method.decide(model, scores, sweep, probe.attribution, c)
    guard = {} if choice.guard is None else choice.guard.to_json()
    meta = {**guard, **choice.components.meta, "attribution": c.attribution, "target": c.target, "steps": att.steps,
            "method": att.method, "rule": att.rule, "normalisation": c.normalisation, "n_attr": c.n,
            "n_dev": c.n_dev, "shots": c.shots, "seed": c.seed, **numerics(model), "run": run,
            "scores_path": str(final[".scores.safetensors"].resolve()),
            "completeness_error_median": float(att.completeness_error().median()),
            "sweep": sweep.to_json(), "times": times, "config": asdict(c),
            "intervention": {"ablation": "zero", "positions": "all"}}
    neurons = Components(choice.components.pairs, fp, meta, kind=choice.components.kind)
    neurons.meta["layer_counts"] = neurons.layer_counts(model.cfg.n_layers)
    neurons.save(staging / out.name)
    _swap_in({**{staging / f.name: f for f in final.values()}, staging / out.name: out})
    shutil.rmtree(staging, ignore_errors=True)
    checkpoint.unlink(missing_ok=True)
    return replace(neurons, source=out)
