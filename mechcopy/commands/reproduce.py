"""`mechcopy reproduce`: the main job (find -> evaluate -> task vectors -> patching -> report)."""

from __future__ import annotations

from pathlib import Path

from mechcopy.commands.common import (add_config_args, add_model_args, config_from_args, model_path, open_model,
                                      prepare_out_dir, saved_in)
from mechcopy.commands.find import check_probe
from mechcopy.reproduce import STAGES, ReproduceConfig, check_out, reproduce

HELPS = {
    "find.n": "probe prompts for attribution",
    "find.n_dev": "probe dev prompts for the k sweep",
    "find.steps": "Integrated Gradients steps",
    "find.seed": "seed of the probe (find's prompts and its guard's random sets)",
    "n_eval": "prompts per task in the evaluation",
    "n_random": "random-neuron baseline sets",
    "seed": "seed of the evaluation's prompts and baselines, the task vectors and the patching",
}


def check_inputs(cfg: ReproduceConfig) -> None:
    """What the stages read that needs no model, checked before it loads: the probe's size and shots."""
    check_probe(cfg.find, "--find-n + --find-n-dev")


def run(args) -> int:
    cfg = config_from_args(ReproduceConfig, args)
    check_inputs(cfg)
    out = prepare_out_dir(args.out or f"results/{cfg.model}", {"--model": model_path(args.model)}, args.force,
                          resume="settings.json")
    check_out(cfg, out)
    done = [name for name, _ in STAGES if (out / f"{name}.json").exists()]
    if (out / "settings.json").exists():
        print(f"resuming the run in {out} (stages done: {', '.join(done) or 'none'})")
    args.saved = saved_in(out, "the finished stages and the checkpoints of find and evaluate are")
    reproduce(open_model(args), cfg, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the main job: copy neurons -> pruning -> evaluation -> task vectors "
                                         "-> patching -> HTML report (resumes if interrupted)")
    add_model_args(p)
    add_config_args(p, ReproduceConfig, HELPS)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default results/MODEL); a folder of an interrupted run resumes")
    p.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    p.set_defaults(run=run)
