"""Train, save and load the model organisms (a small HookedTransformer and a small HookedMamba).

Saved folder: `model.safetensors` (weights), `organism.json` (architecture, model sizes, training
config, fingerprint, final metrics), `loss.json` and `loss.png` (the loss curve). Never pickle.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from mechcopy.arch import HookedModel
from mechcopy.errors import check_minimums, check_number
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import as_tuples, read_json, write_atomic, write_json_atomic
from mechcopy.models.zoo import cache_root
from mechcopy.organisms.data import FAMILIES, CharCodec, episode_length, episode_text, episodes, make_batch
from mechcopy.progress import tqdm

ARCHS = ("transformer", "mamba")
CONFIG_FILE = "organism.json"
WEIGHTS_FILE = "model.safetensors"

# Default sizes and steps: about 9 minutes each on one CPU core (measured: transformer 8,000 steps in
# 558 s, Mamba 6,000 steps in 504-518 s, two trainings side by side on a 2-core machine).
DEFAULT_STEPS = {"transformer": 8000, "mamba": 6000}
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "transformer": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_ctx": 128},
    "mamba": {"n_layers": 2, "d_model": 64, "d_state": 8},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines an organism (with the seed, training is reproducible on one machine)."""

    arch: str = "transformer"
    steps: int | None = None  # default: DEFAULT_STEPS[arch]
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    k_min: int = 2
    k_max: int = 6
    families: tuple[str, ...] = ("map", "map", "class", "class", "shift")  # repeated: sampled more often
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 250
    device: str = "cpu"
    max_minutes: float | None = None  # stop (and save) after this wall time; the schedule ends then too

    MINIMUM: ClassVar[dict[str, int | float]] = {"steps": 1, "batch_size": 1, "warmup": 0, "seed": 0, "eval_every": 1,
                                                 "k_min": 1, "k_max": 1, "weight_decay": 0.0}

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        object.__setattr__(self, "steps", DEFAULT_STEPS[self.arch] if self.steps is None else self.steps)
        check_minimums(self)
        if not self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        check_number(self.lr, "lr (learning rate)", above=0.0)
        if self.max_minutes is not None:
            check_number(self.max_minutes, "max_minutes", above=0.0)
        object.__setattr__(self, "families", tuple(self.families))
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"families must name some of {', '.join(FAMILIES)}, got {list(self.families)}")
        object.__setattr__(self, "model_kwargs", {**DEFAULT_MODEL_KWARGS[self.arch], **self.model_kwargs})
        check_model_kwargs(self.arch, self.model_kwargs, longest=episode_length(self.k_max))

    @property
    def name(self) -> str:
        return f"{self.arch}-s{self.seed}"

    @property
    def n_steps(self) -> int:
        """The training steps (`steps`, which is the architecture's default when not given)."""
        return int(self.steps if self.steps is not None else DEFAULT_STEPS[self.arch])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TrainConfig":
        return cls(**{f.name: as_tuples(obj[f.name]) for f in fields(cls) if f.name in obj})


#: the model sizes `model_kwargs` may set, per architecture (`tiny_transformer`, `tiny_mamba`), and their kinds
MODEL_KWARGS: dict[str, dict[str, type]] = {
    "transformer": {"n_layers": int, "d_model": int, "n_heads": int, "d_mlp": int, "n_ctx": int,
                    "n_key_value_heads": int, "gated": bool},
    "mamba": {"n_layers": int, "d_model": int, "d_state": int, "d_conv": int, "expand": int, "dt_rank": int},
}


def check_model_kwargs(arch: str, kwargs: Any, longest: int | None = None,
                       name: str = "model_kwargs") -> None:
    """Refuse model sizes that cannot build a model (before any training): unknown keys, sizes that
    are not integers >= 1, heads that do not divide d_model (or give an odd head size, which rotary
    embeddings cannot split), and a context shorter than the `longest` training sequence."""
    known = MODEL_KWARGS[arch]
    if not isinstance(kwargs, dict):
        raise TypeError(f"{name} must be a dict such as {{\"d_model\": 96}}, got {type(kwargs).__name__}")
    unknown = sorted(str(k) for k in kwargs if k not in known)
    if unknown:
        raise ValueError(f"{name}: unknown size {unknown[0]!r} for a {arch}; known: {', '.join(known)}")
    for key, value in kwargs.items():
        if known[key] is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {key} must be true or false, got {value!r}")
        elif value is not None or key != "dt_rank":
            check_number(value, f"{name}: {key}", low=1, integer=True)
            if value > 1 << 16:
                raise ValueError(f"{name}: {key} = {value} is far beyond a model organism (at most {1 << 16})")
    if arch == "transformer":
        d, h = kwargs["d_model"], kwargs["n_heads"]
        if d % h or (d // h) % 2:
            raise ValueError(f"{name}: n_heads {h} must divide d_model {d} into heads of an even size "
                             "(rotary embeddings rotate pairs of dimensions)")
        kv = kwargs.get("n_key_value_heads")
        if kv is not None and h % kv:
            raise ValueError(f"{name}: n_key_value_heads {kv} must divide n_heads {h}")
        if longest is not None and kwargs["n_ctx"] < longest:
            raise ValueError(f"{name}: n_ctx {kwargs['n_ctx']} is shorter than the longest training "
                             f"sequence ({longest} tokens at k_max demonstrations); raise n_ctx or lower k_max")


def build_model(arch: str, model_kwargs: dict[str, Any], seed: int, device: str = "cpu") -> HookedModel:
    """A fresh (random) organism of `arch` with the character tokenizer."""
    model: HookedModel
    if arch == "transformer":  # the models import TransformerLens (seconds): only when one is built
        from mechcopy.models.tiny import tiny_transformer

        model = cast(HookedModel, tiny_transformer(seed=seed, **model_kwargs))   # it has a tokenizer (TL: optional)
    elif arch == "mamba":
        from mechcopy.models.mamba import tiny_mamba

        model = tiny_mamba(seed=seed, **model_kwargs)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return model.to(device)


def _lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine to 10% over the steps or the time budget, whichever ends first."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, max((step - cfg.warmup) / max(1, cfg.n_steps - cfg.warmup), time_fraction))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def quick_accuracy(model: HookedModel, sets: tuple[str, ...] = ("map-heldout", "shift-heldout", "class", "probe"),
                   n: int = 64, shots: int = 4, seed: int = 12345) -> dict[str, float]:
    """Query accuracy per evaluation set, straight from token ids (no prompt builder): for training logs."""
    codec = CharCodec(model.tokenizer)
    device = next(model.parameters()).device
    out = {}
    for name in sets:
        eps = episodes(name, n, shots, seed)
        ids = torch.tensor([codec.encode(episode_text(e, with_answer=False)) for e in eps], device=device)
        pred = model(ids)[:, -1].argmax(-1)
        gold = torch.tensor([codec.char_to_id[e.query[1]] for e in eps], device=device)
        out[name] = (pred == gold).float().mean().item()
    return out


@dataclass(frozen=True)
class TrainResult:
    out_dir: str
    config: TrainConfig
    final_loss: float
    final_accuracy: dict[str, float]
    seconds: float
    steps_done: int = 0
    stopped_early: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TrainResult":
        values = {f.name: obj[f.name] for f in fields(cls) if f.name in obj}
        return cls(**{**values, "config": TrainConfig.from_json(obj["config"])})


def train_organism(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True,
                   model=None) -> tuple[Any, TrainResult]:
    """Train an organism with AdamW on fresh synthetic batches; save it to `out_dir` if given.

    Loss: cross-entropy on every output character (each demo's label and the query's answer).
    Returns the trained model (eval mode) and a `TrainResult`.
    """
    torch.manual_seed(cfg.seed)
    model = model if model is not None else build_model(cfg.arch, cfg.model_kwargs, cfg.seed, cfg.device)
    codec = CharCodec(model.tokenizer)
    rng = random.Random(f"organism-train-{cfg.seed}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start = time.time()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    time_fraction = lambda: (time.time() - start) / budget if budget else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg, time_fraction()))
    curve: dict[str, list] = {"step": [], "loss": [], "query_loss": [], "eval_step": [], "eval": []}
    model.train()
    bar = tqdm(range(cfg.n_steps), desc=f"train {cfg.name}", disable=not progress, mininterval=2)
    stopped = None
    for step in bar:
        if budget and step and time.time() - start > budget:    # at least one step, whatever the budget
            stopped = f"time budget of {cfg.max_minutes} min reached after {step} steps"
            break
        batch = make_batch(codec, rng, cfg.batch_size, (cfg.k_min, cfg.k_max), cfg.families)
        tokens = batch.tokens.to(cfg.device)
        logits = model(tokens)
        mask = batch.loss_mask[:, :-1].to(cfg.device)
        targets = tokens[:, 1:]
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        loss = losses[mask].mean()
        if not torch.isfinite(loss):
            raise ValueError(f"training diverged at step {step} (loss {loss.item()}); nothing was saved: lower the "
                             f"learning rate (lr = {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        qloss = losses[batch.query_mask[:, :-1].to(cfg.device)].mean().item()
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        curve["query_loss"].append(qloss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps or (budget and time_fraction() >= 1):
            model.eval()
            acc = quick_accuracy(model)
            model.train()
            curve["eval_step"].append(step + 1)
            curve["eval"].append(acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k.split("-")[0][:5]: f"{v:.2f}" for k, v in acc.items()})
    model.eval()
    seconds = time.time() - start
    final_loss = sum(curve["loss"][-50:]) / len(curve["loss"][-50:])
    result = TrainResult(str(out_dir) if out_dir else "", cfg, final_loss,
                         curve["eval"][-1] if curve["eval"] else {}, seconds, len(curve["step"]), stopped)
    if out_dir is not None:
        save_organism(model, cfg, out_dir, curve, result)
    return model, result


def save_organism(model: HookedModel, cfg: TrainConfig, out_dir: str | Path, curve: dict | None = None,
                  result: TrainResult | None = None) -> Path:
    """Write weights (safetensors), config JSON and, if given, the loss curve (JSON + PNG)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / WEIGHTS_FILE, save(state, metadata={"format": "pt", "arch": cfg.arch}))
    meta = {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "seed": cfg.seed, "tokenizer": "char",
            "train": cfg.to_json(), "fingerprint": model_fingerprint(model),
            "result": result.to_json() if result else None}
    write_json_atomic(out / CONFIG_FILE, meta)
    if curve is not None:
        write_json_atomic(out / "loss.json", curve)
        plot_loss(curve, out / "loss.png", title=cfg.name)
    return out


def plot_loss(curve: dict, path: str | Path, title: str = "") -> Path:
    """Loss (smoothed) and periodic held-out accuracies against the step (`viz.plot_loss_curve`)."""
    from mechcopy import viz  # matplotlib: heavy, only for the figure

    evals: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        name: (curve["eval_step"], [e[name] for e in curve["eval"]]) for name in (curve["eval"] or [{}])[0]}
    fig = viz.plot_loss_curve(curve["step"], {"all outputs": curve["loss"], "query": curve["query_loss"]},
                              title=title, evals=evals or None, smooth=max(1, len(curve["loss"]) // 100))
    return viz.save_figure(fig, path)


def load_organism(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The trained hooked model saved in folder `path` by `train_organism`, on `device` in `dtype`."""
    folder = Path(path).expanduser()
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} holds no organism ({CONFIG_FILE} missing): train one with "
                                "`mechcopy train-organism --arch transformer --out DIR`")
    meta = read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("arch") not in ARCHS or not isinstance(meta.get("seed"), int):
        raise ValueError(f"{cfg_path} is not an organism's description (it needs \"arch\" ({', '.join(ARCHS)}), "
                         "\"model_kwargs\" and \"seed\"); train the organism again")
    check_model_kwargs(meta["arch"], meta.get("model_kwargs"), name=f"{cfg_path}: model_kwargs")
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no weights ({WEIGHTS_FILE} missing): train the organism again")
    model = build_model(meta["arch"], meta["model_kwargs"], meta["seed"], device)
    state = load_file(str(folder / WEIGHTS_FILE), device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the model {CONFIG_FILE} describes "
                         f"({' '.join(str(e).split())[:200]}); train the organism again") from None
    model.to(dtype)
    model.eval()
    return model


def default_dir(arch: str, seed: int) -> Path:
    """Where `train-organism` saves by default: the user's cache, never the git tree."""
    return cache_root() / "organisms" / f"{arch}-s{seed}"
