"""Model organisms: a small transformer and a small Mamba trained for in-context learning.

`data` generates synthetic ICL episodes (maps, shifts, few-label classes, a copy probe) over the
character tokenizer; `train` trains, saves (safetensors + JSON) and loads them.
"""

from mechcopy.organisms.data import (
    EVAL_SETS,
    FAMILIES,
    PROBES,
    Episode,
    Function,
    is_held_out,
    make_function,
    organism_prompts,
    probe_splits,
    sample_episode,
    sample_function,
)
from mechcopy.organisms.train import TrainConfig, TrainResult, load_organism, train_organism

__all__ = [
    "EVAL_SETS", "FAMILIES", "PROBES", "Episode", "Function", "is_held_out", "make_function", "organism_prompts",
    "probe_splits", "sample_episode", "sample_function", "TrainConfig", "TrainResult", "load_organism",
    "train_organism",
]
