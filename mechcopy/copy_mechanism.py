"""The copy-mechanism study's best mechanistic selection as a component file (`mechcopy find --recipe
copy-mechanism`; the study is `analyses/copy_mechanism.py`, its results `docs/data/copy_mechanism_<model>.json`
and, for the arms added later, `docs/data/copy_mechanism_<model>[-n<N>]_<arm>.json` beside it).

The study chose its component sets on the copy probe's dev split, one per selection seed and arm. The
recipe replays the one with the highest dev accuracy over every arm the study ran (`BEST_ARMS`, in tie
order: a tie goes to the earlier arm, then the lower seed; no held-out figure enters): the same
components, the ablation and positions the dev split chose, the factor of an attention edit, and, for
mean ablation, the means over the same attribution prompts (the copy probe's attribution split of that
seed, rebuilt from its seeds), recorded in meta `intervention`, so that `mechcopy evaluate --prune FILE`
applies it as the study did. Where no seed chose a set, the file holds no components and says why
(k = 0), as `find` does when no k helps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mechcopy.arch import HookedModel
from mechcopy.components import Components
from mechcopy.fingerprint import model_fingerprint
from mechcopy.pruning import component_means
from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe

#: the arms whose sets may be "the best mechanistic intervention" (docs/copy_mechanism.md), in tie order
BEST_ARMS = ("neurons", "heads", "heads-last", "heads-attn", "unibias")
#: the component kind of each arm (`unibias` records its own: heads or neurons)
KINDS = {"neurons": "neuron", "heads": "head", "heads-last": "head", "heads-attn": "head"}


def study_path(model_name: str, root: str | Path = ".") -> Path:
    """Where the study's summary for a zoo model is committed."""
    return Path(root) / "docs" / "data" / f"copy_mechanism_{model_name}.json"


def load_study(path: str | Path) -> dict[str, Any]:
    """The study's summary JSON (`analyses/copy_mechanism.py --stage summary`), checked for what the
    recipe reads, with the selections of the arms summarised beside it (`copy_mechanism_<model>*_<arm>.json`
    in the same folder; selections do not depend on the held-out n, so two files of one arm must agree)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no copy-mechanism study at {path}: run analyses/copy_mechanism.py for the model "
                                "(its stages, then --stage summary), or pass --study PATH")
    study = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("model", "settings", "selections") if k not in study]
    if missing:
        raise ValueError(f"{path} is not a copy-mechanism study summary (no {', '.join(missing)})")
    selections = dict(study["selections"])
    for arm in BEST_ARMS:
        for side in sorted(path.parent.glob(f"{path.stem}*_{arm}.json")):
            sels = json.loads(side.read_text(encoding="utf-8")).get("selections", {}).get(arm)
            if sels is None:
                continue
            if arm in selections and selections[arm] != sels:
                raise ValueError(f"{side} holds other {arm} selections than the study beside it: summarise the "
                                 "study again (analyses/copy_mechanism.py --stage summary)")
            selections[arm] = sels
    return {**study, "selections": selections}


def best_selection(study: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(arm, selection) of the chosen set with the highest dev accuracy over the seeds of `BEST_ARMS`
    (ties to the earlier arm, then the lower seed); None when no seed of them chose a set."""
    best: tuple[str, dict[str, Any]] | None = None
    for arm in BEST_ARMS:
        for sel in study["selections"].get(arm, []):
            if sel.get("chosen") and (best is None or sel["chosen"]["dev_accuracy"] > best[1]["chosen"]["dev_accuracy"]):
                best = (arm, sel)
    return best


def recipe_components(model: HookedModel, study: Mapping[str, Any]) -> Components:
    """The study's best mechanistic selection on `model`, with its intervention in meta `intervention`."""
    fingerprint = model_fingerprint(model)
    meta: dict[str, Any] = {"recipe": "copy-mechanism", "study_model": study["model"]}
    best = best_selection(study)
    if best is None:
        meta.update(k=0, why="no selection seed of the copy-mechanism study chose a set (every arm's dev sweep "
                             "chose nothing): there is nothing to prune")
        return Components((), fingerprint, meta)
    arm, sel = best
    s, chosen = study["settings"], sel["chosen"]
    kind = sel.get("kind") or KINDS[arm]
    ablation, positions = chosen["ablation"], chosen.get("positions", s["positions"])
    intervention: dict[str, Any] = {"ablation": ablation, "positions": positions}
    if chosen.get("factor") is not None:     # an attention edit (heads-attn)
        intervention["factor"] = chosen["factor"]
    if ablation == "mean":
        config = CopyProbeConfig(tuple(s["probe_tasks"]), "no-gold", s["shots"], s["n_attr"], s["n_dev"], s["n_test"])
        probe = build_copy_probe(model.tokenizer, config, seed=s["probe_seed"], attribution_seed=sel["seed"])
        reference = f"copy probe attribution split (no-gold), selection seed {sel['seed']}"
        intervention["means"] = component_means(model, probe.attribution, kind, positions, reference=reference).to_json()
    meta.update(k=len(chosen["components"]), arm=arm, seed=sel["seed"], condition=chosen["condition"],
                dev_accuracy=chosen["dev_accuracy"], dev_unpruned_accuracy=sel["dev_unpruned_accuracy"],
                ppl_increase=chosen["ppl_increase"], intervention=intervention)
    return Components(tuple((int(l), int(i)) for l, i in chosen["components"]), fingerprint, meta, kind=kind)
