"""`mechcopy reproduce`: the main job (find -> evaluate -> task vectors -> patching -> report)."""

from __future__ import annotations

from mechcopy.commands.common import add_config_args, add_model_args, config_from_args, open_model
from mechcopy.reproduce import ReproduceConfig

HELPS = {
    "n_probe": "probe prompts for attribution",
    "n_dev": "probe dev prompts for the k sweep",
    "steps": "Integrated Gradients steps",
    "n_eval": "prompts per task in the evaluation",
    "n_random": "random-neuron baseline sets",
    "seed": "seed of every prompt set and baseline",
}


def run(args) -> int:
    from mechcopy.reproduce import check_out, reproduce

    cfg = config_from_args(ReproduceConfig, args)
    out = args.out or f"results/{cfg.model}"
    check_out(cfg, out)
    reproduce(open_model(args), cfg, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the main job: copy neurons -> pruning -> evaluation -> task vectors "
                                         "-> patching -> HTML report (resumes if interrupted)")
    add_model_args(p)
    add_config_args(p, ReproduceConfig, HELPS)
    p.add_argument("--out", default=None, help="output folder (default results/MODEL)")
    p.set_defaults(run=run)
