"""The second hostile campaign (issue 28): every case the issue quotes, and the kinds it names, as tests.

Each row states the behaviour we want: a refusal is one line on stderr that names the input and the
fix, exit status 2, no traceback, nothing overwritten, and it comes before the model loads unless the
row says the check needs the model; an API call raises one of the project's own errors
(`mechcopy.errors.own_error`: a ValueError, TypeError, IndexError, FileNotFoundError or UnknownName
raised by mechcopy's code) whose message starts as the row says; a run that must work gives the
correct result. Command rows run in-process through `mechcopy.commands.main`, in a fresh folder
holding the files of `tests/test_reliability.py` and those below, with `--model tiny` standing for
the tiny random transformer (2 layers of 64 neurons) where the model does not matter.

Rows fixed on the core that issue 23 rebuilt (journals and checkpoints, the neuron set's checks,
selection, the evaluator, perplexity, `find`'s k grid) say in `part_b` what it took; rows still
`open` say why and run as `xfail` (not strict) until they are fixed. `kind` is the issue's
classification of what each case got on main 81a615e: data loss, silently wrong, internal error, raw
API exception, late refusal, unclear message. `python tests/test_hostile.py` writes the rows into docs/reliability.md
(`test_doc_table_is_current` fails when the two differ).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch

from test_reliability import WORDS, Disk, _interrupt_after, _neurons, _task, json_at, make_files, only, snapshot

# the refusals users get: annotations unchecked at run time, as outside the tests (conftest.annotations_unchecked)
pytestmark = pytest.mark.usefixtures("annotations_unchecked")

KINDS = ("data loss", "silently wrong", "internal error", "raw API exception", "late refusal", "unclear message")
PART_B = "issue 28 part B, after issue 23"
PACKAGE = Path(__import__("mechcopy").__file__).resolve().parent    # the package these tests run
UNCHANGED = Disk("nothing written; every input unchanged", lambda d, before: snapshot(d) == before)


class ModelLoaded(BaseException):
    """Raised by the test's model loader where a row must be refused before any model loads (a
    BaseException, so `main` cannot turn it into an error line)."""


# ------------------------------------------------------------------------------------------- the files


def _tiny(dtype: torch.dtype = torch.float32):
    from mechcopy.models.tiny import tiny_transformer

    return tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0).to(dtype)


def _fingerprint():
    from mechcopy.neurons import model_fingerprint

    return model_fingerprint(_tiny())


def make_more(folder: Path) -> None:
    """The files of `test_reliability.make_files`, and these (names as in the rows)."""
    from mechcopy.attribution import CopyScores

    make_files(folder)
    fp = _fingerprint()
    twelve = [(w, w.upper()) for w in WORDS]
    files = {
        "T.json": _task("twelve", twelve),
        "a,b.json": _task("ab", twelve[:8]),
        "pooled.json": _task("pooled", twelve[:8]),
        "dupkeys.json": '{"name": "dk", "pairs": [["ab", "AB"], ["cd", "CD"], ["ef", "EF"]], '
                        '"pairs": [["gh", "GH"], ["ij", "IJ"], ["kl", "KL"]]}',
        "dupkind.json": '{"name": "dk", "pairs": [["ab", "AB"], ["cd", "CD"], ["ef", "EF"]], "kind": "user", '
                        '"kind": "probe"}',
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "one_word.txt": "hello",
        "r.partial.jsonl": '{"key": "another run\'s journal", "row": {}}\n',
        "neg.json": _neurons(fp, [[-1, 3]]),
        "beyond.json": _neurons(fp, [[5, 3]]),
        "N.json": _neurons(fp, [[0, 1], [1, 2]], scores_path="N.scores.safetensors"),
        "M.json": _neurons(fp, [[0, 1], [1, 2]], scores_path="elsewhere/S.safetensors"),
        "nanscores.json": _neurons(fp, [[0, 1]], scores_path="nan.scores.safetensors"),
        "shape.json": _neurons(fp, [[0, 1]], scores_path="shape.scores.safetensors"),
        "listcfg/config.json": "[]",
        "N.attributions.safetensors": "find's checkpoint of N.json",
        "fold.json/inside.txt": "a folder named like a task file",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    gen = torch.Generator().manual_seed(0)
    CopyScores(torch.rand(2, 64, generator=gen), {"model": fp}).save(folder / "N.scores.safetensors")
    (folder / "elsewhere").mkdir()
    CopyScores(torch.rand(2, 64, generator=gen), {"model": fp}).save(folder / "elsewhere" / "S.safetensors")
    nan = torch.rand(2, 64, generator=gen)
    nan[1, :5] = float("nan")      # written as CopyScores.save writes, which would refuse the NaN itself
    (folder / "nan.scores.safetensors").write_bytes(safetensors.torch.save(
        {"scores": nan}, metadata={"mechcopy": json.dumps({"model": fp})}))
    CopyScores(torch.rand(2, 4, generator=gen), {"model": fp}).save(folder / "shape.scores.safetensors")
    cache = folder / "cache" / "models" / "smollm2-135m"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")


# ------------------------------------------------------------------------------------------- helpers


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `mechcopy argv` in-process: (exit status, stdout, stderr)."""
    from mechcopy.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def interrupt(monkeypatch, target: str, n_calls: int) -> None:
    """Ctrl-C on the n-th call of `target` (module.function or module.Class.method) from now on."""
    _interrupt_after(target, n_calls)(monkeypatch, None)


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k not in ("seconds", "git_revision")}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


EV2 = ("evaluate", "--model", "tiny", "--tasks", "t.json,dup.json", "--shots", "2")
FIND = ("find", "--model", "tiny", "--n", "2", "--n-dev", "2", "--shots", "2", "--steps", "2", "--ks", "2",
        "--ppl-tokens", "64", "--checkpoint-every", "1")


# ------------------------------------------------------------------------------------------- scenarios (part B)


def find_force_swap(folder: Path, monkeypatch) -> None:
    """`find --force` over a finished run, killed while writing its files (the scores, the neuron file,
    or between two of the swaps): the neuron file never points at another run's scores or attributions
    without being refused (the set is written, then swapped in, the neuron file last)."""
    import mechcopy.find
    from mechcopy.attribution import Attributions, CopyScores
    from mechcopy.components import Components
    from mechcopy.conditions import find_scores

    assert cli(*FIND, "--out", "f.json")[0] == 0
    first = json.loads((folder / "f.json").read_text())
    scores = CopyScores.load(first["meta"]["scores_path"]).scores.clone()
    attributions = Attributions.load(folder / "f.attributions.safetensors")[0].values.clone()
    real_swap = mechcopy.find._swap_in

    def half_swap(staged):   # two moves done (attributions, scores), then Ctrl-C
        real_swap(dict(list(staged.items())[:2]))
        raise KeyboardInterrupt

    for target in ("mechcopy.attribution.CopyScores.save", "mechcopy.components.Components.save", "swap"):
        with monkeypatch.context() as m:
            if target == "swap":
                m.setattr(mechcopy.find, "_swap_in", half_swap)
            else:
                interrupt(m, target, 1)
            assert cli(*FIND, "--seed", "1", "--out", "f.json", "--force")[0] == 130, target
        now = json.loads((folder / "f.json").read_text())
        assert now == first, f"{target}: the neuron file changed although the run was stopped"
        if target == "swap":    # a set swapped in half: refused where it is read, by the run id
            assert Attributions.load(folder / "f.attributions.safetensors")[1]["run"] != now["meta"]["run"]
            with pytest.raises(ValueError, match="these copy scores are of another `find` run than f.json"):
                find_scores(Components.load("f.json"))
        else:
            assert torch.equal(CopyScores.load(now["meta"]["scores_path"]).scores, scores), target
            assert torch.equal(Attributions.load(folder / "f.attributions.safetensors")[0].values, attributions), target
            find_scores(Components.load("f.json"))
    assert cli(*FIND, "--seed", "1", "--out", "f.json", "--force")[0] == 0
    now = json.loads((folder / "f.json").read_text())
    assert now["meta"]["run"] != first["meta"]["run"] and not (folder / ".f.json.staging").exists()
    assert CopyScores.load(now["meta"]["scores_path"]).meta["run"] == now["meta"]["run"]
    assert Attributions.load(folder / "f.attributions.safetensors")[1]["run"] == now["meta"]["run"]


def journal_other_n(folder: Path, monkeypatch) -> None:
    """An interrupted --n 6, then --n 5, then --n 6: the --n 6 rows are reused, or their loss is said."""
    interrupt(monkeypatch, "mechcopy.suite.evaluate_task", 2)
    assert cli(*EV2, "--n", "6", "--out", "r3.json")[0] == 130
    interrupt(monkeypatch, "mechcopy.suite.evaluate_task", 1)
    _, _, said = cli(*EV2, "--n", "5", "--out", "r3.json")
    assert "r3.partial.jsonl also holds 1 row of other settings" in said, said
    code, _, err = cli(*EV2, "--n", "6", "--out", "r3.json")
    assert code == 0 and "resuming from r3.partial.jsonl: 1 of 2" in err, f"the --n 6 row was not reused:\n{err}"


def journal_other_dtype(folder: Path, monkeypatch) -> None:
    """A run interrupted in float32 and resumed in bfloat16 reuses nothing and equals a clean bfloat16 run."""
    interrupt(monkeypatch, "mechcopy.suite.evaluate_task", 2)
    assert cli(*EV2, "--n", "4", "--out", "r4.json")[0] == 130
    code, _, err = cli(*EV2, "--n", "4", "--dtype", "bfloat16", "--out", "r4.json")
    assert code == 0 and "resuming from" not in err, f"float32 rows reused in a bfloat16 run:\n{err}"
    assert cli(*EV2, "--n", "4", "--dtype", "bfloat16", "--out", "r5.json")[0] == 0
    resumed, clean = (json.loads((folder / f).read_text()) for f in ("r4.json", "r5.json"))
    assert _without_seconds(resumed["results"]) == _without_seconds(clean["results"])


def find_other_dtype(folder: Path, monkeypatch) -> None:
    """find interrupted in float32 does not resume in bfloat16 (dtype is in the checkpoint's identity)."""
    interrupt(monkeypatch, "mechcopy.method.integrated_gradients", 2)
    assert cli(*FIND, "--out", "g.json")[0] == 130
    code, _, err = cli(*FIND, "--dtype", "bfloat16", "--out", "g.json")
    assert code == 0 and "resuming from checkpoint" not in err, f"float32 attributions reused in bfloat16:\n{err}"
    assert "g.partial.safetensors holds 1 prompts attributed with other settings (dtype 'float32' here, " \
           "'bfloat16' now)" in err, err


def journal_edited(folder: Path, monkeypatch) -> None:
    """A journal row edited by hand (accuracy 0.999 against its own per-prompt outcomes) is not reused as is."""
    interrupt(monkeypatch, "mechcopy.suite.evaluate_task", 2)
    assert cli(*EV2, "--n", "4", "--out", "r6.json")[0] == 130
    journal = folder / "r6.partial.jsonl"
    entry = json.loads(journal.read_text().splitlines()[0])
    entry["row"]["accuracy"] = 0.999
    journal.write_text(json.dumps(entry) + "\n")
    code, _, err = cli(*EV2, "--n", "4", "--out", "r6.json")
    assert code == 0 and "r6.partial.jsonl: 1 line not reused (line 1: its row does not match its digest" in err, err
    for row in json.loads((folder / "r6.json").read_text())["results"]:
        assert math.isclose(row["accuracy"], sum(row["correct"]) / len(row["correct"])), row


def journal_null_row(folder: Path, monkeypatch) -> None:
    """A journal row that is null: the rerun recomputes it, or refuses naming the journal and the fix."""
    interrupt(monkeypatch, "mechcopy.suite.evaluate_task", 2)
    assert cli(*EV2, "--n", "4", "--out", "r7.json")[0] == 130
    journal = folder / "r7.partial.jsonl"
    entry = json.loads(journal.read_text().splitlines()[0])
    journal.write_text(json.dumps({**entry, "row": None}) + "\n")
    code, _, err = cli(*EV2, "--n", "4", "--out", "r7.json")
    assert code == 0 and "r7.partial.jsonl: 1 line not reused (line 1: its row is NoneType, not a result row)" in err, err


def find_other_rule(folder: Path, monkeypatch) -> None:
    """find resumed with another --rule starts over (and says so) instead of failing on every rerun."""
    interrupt(monkeypatch, "mechcopy.method.integrated_gradients", 2)
    assert cli(*FIND, "--out", "h.json")[0] == 130
    code, _, err = cli(*FIND, "--rule", "midpoint", "--out", "h.json")
    assert code == 0, err
    assert "h.partial.safetensors" in err and "resuming" not in err and "rule 'gauss-legendre' here" in err, err


def separator_stop(folder: Path, monkeypatch) -> None:
    """Prompts built with another separator are evaluated with that separator as the stop: a model
    forced to answer "XY|Z..." after every "-> " is right on "ab -> XY|cd -> XY|ef -> "."""
    from mechcopy.evaluation import evaluate
    from mechcopy.models.tiny import tiny_transformer
    from mechcopy.tasks import Task
    from mechcopy.tasks.prompts import build_prompts

    model = tiny_transformer(n_layers=1, d_model=128, n_heads=4, d_mlp=16, seed=1)
    tok = model.tokenizer
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.embed.W_E[torch.arange(model.cfg.d_vocab), torch.arange(model.cfg.d_vocab)] = 1.0
        model.ln_final.w.fill_(1.0)
        model.unembed.W_U.zero_()
        model.unembed.b_U.zero_()
        for a, b in {" ": "X", "X": "Y", "Y": "|", "|": "Z", "Z": "Z"}.items():
            (ia,), (ib,) = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
            model.unembed.W_U[ia, ib] = 1.0
    silence = [(f"blocks.0.hook_{part}_out", lambda act, hook: torch.zeros_like(act)) for part in ("attn", "mlp")]
    task = Task("xy", tuple((w, "XY") for w in ("ab", "cd", "ef", "gh", "ij")))
    prompts = build_prompts(task, tok, 2, 3, sep="|").prompts
    assert all(p.text.endswith("-> ") and "|" in p.text for p in prompts)
    assert evaluate(model, prompts, fwd_hooks=silence).accuracy == 1.0


def text_shorter_than_ppl_tokens(folder: Path, monkeypatch) -> None:
    code, _, err = cli(*FIND, "--text", "one_word.txt", "--ppl-tokens", "4096", "--out", "p.json")
    assert code == 2 and "--ppl-tokens" in err and "one_word.txt" in err, err


def nan_scores_select(folder: Path, monkeypatch) -> None:
    from mechcopy.attribution import CopyScores

    with pytest.raises(ValueError, match="nan.scores.safetensors: copy scores must be finite: 5 of 128 are NaN"):
        CopyScores.load(folder / "nan.scores.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        CopyScores(torch.tensor([[0.5, float("nan")]]))


# ------------------------------------------------------------------------------------------- API calls


def _prompts(n: int = 3):
    from mechcopy.models.tiny import char_tokenizer
    from mechcopy.tasks import load_task
    from mechcopy.tasks.prompts import build_prompts

    return build_prompts(load_task("to_upper"), char_tokenizer(), 2, n).prompts


LABELS = ("no", "yes", "maybe")


def _label_prompts(n: int = 4):
    """Prompts of a closed-label task (three labels), for label scoring and the copy effect."""
    from mechcopy.models.tiny import char_tokenizer
    from mechcopy.tasks import Task
    from mechcopy.tasks.prompts import build_prompts

    task = Task("answers", tuple((w, LABELS[i % 3]) for i, w in enumerate(WORDS)))
    return build_prompts(task, char_tokenizer(), 2, n).prompts


def _copy_effect(**kw):
    from mechcopy.copy_effect import copy_effect

    prompts = _label_prompts()
    return copy_effect(prompts, ["no"] * len(prompts), kw.pop("labels", LABELS), **kw)


def _score_labels(**kw):
    from mechcopy.scoring import score_labels

    return score_labels(_tiny(), _label_prompts(), kw.pop("labels", LABELS), **kw)


def _tokens(model, text: str = "ab -> AB"):
    return model.to_tokens(text)


def _tiny_folder(folder: Path) -> Path:
    """A Hugging Face folder holding a tiny random Llama with the character tokenizer (beside the row's
    folder, whose disk check wants it unchanged)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechcopy.models.tiny import char_tokenizer

    d = folder.parent / f"{folder.name}-tiny-hf"
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _no_cuda() -> str | None:
    return "this machine has CUDA" if torch.cuda.is_available() else None


API = {
    "scale_neurons_nan": lambda d: __import__("mechcopy.hooks").hooks.scale_neurons([3], float("nan")),
    "scale_neurons_str": lambda d: __import__("mechcopy.hooks").hooks.scale_neurons([3], "2"),
    "set_neurons_nan": lambda d: __import__("mechcopy.hooks").hooks.set_neurons([1, 2], [0.5, float("nan")]),
    "inject_nan": lambda d: __import__("mechcopy.hooks").hooks.inject_vector(torch.full((32,), float("inf"))),
    "summarize_n_boot_1": lambda d: __import__("mechcopy.evaluation").evaluation.summarize(
        _prompts(), [p.answer for p in _prompts()], n_boot=1),
    "paired_n_boot_1": lambda d: __import__("mechcopy.stats").stats.paired(
        [1, 0, 1], [0, 0, 1], "t", "pruned", "unpruned", "accuracy", n_boot=1),
    "bootstrap_alpha": lambda d: __import__("mechcopy.stats").stats.bootstrap_ci([1.0, 0.0], alpha=2.0),
    "evaluate_n_boot_0": lambda d: __import__("mechcopy.evaluation").evaluation.evaluate(_tiny(), _prompts(), n_boot=0),
    "neuronset_layer_minus_1": lambda d: __import__("mechcopy.neurons").neurons.NeuronSet(((-1, 3),), _fingerprint()),
    "perplexity_minus_5": lambda d: __import__("mechcopy.evaluation").evaluation.perplexity(_tiny(), n_tokens=-5),
    "build_prompts_2_5": lambda d: __import__("mechcopy.tasks.prompts").tasks.prompts.build_prompts(
        __import__("mechcopy.tasks").tasks.load_task("to_upper"), _tiny().tokenizer, 2.5),
    "load_model_cuda": lambda d: __import__("mechcopy").load_model(_tiny_folder(d), device="cuda"),
    "load_model_dtype_str": lambda d: __import__("mechcopy").load_model(_tiny_folder(d), dtype="float32"),
    "unknown_hook_evaluate": lambda d: __import__("mechcopy.evaluation").evaluation.evaluate(
        _tiny(), _prompts(), fwd_hooks=[("blocks.9.mlp.hook_post", __import__("mechcopy.hooks").hooks.zero_neurons([1]))]),
    "unknown_hook_check": lambda d: __import__("mechcopy.hooks").hooks.check_hook_points(
        _tiny(), [("blocks.9.mlp.hook_post", __import__("mechcopy.hooks").hooks.zero_neurons([1]))]),
    "inject_wrong_size": lambda d: (lambda m: m.run_with_hooks(_tokens(m), fwd_hooks=[
        ("blocks.0.hook_resid_post", __import__("mechcopy.hooks").hooks.inject_vector(torch.zeros(7)))]))(_tiny()),
    "inject_position": lambda d: (lambda m: m.run_with_hooks(_tokens(m, "ab"), fwd_hooks=[
        ("blocks.0.hook_resid_post", __import__("mechcopy.hooks").hooks.inject_vector(torch.zeros(32), 99))]))(_tiny()),
    "findconfig_seed": lambda d: __import__("mechcopy.find").find.FindConfig(seed=2**64),
    "findconfig_inf": lambda d: __import__("mechcopy.find").find.FindConfig(max_ppl_increase=float("inf")),
    "findconfig_text_int": lambda d: __import__("mechcopy.find").find.FindConfig(text=123),
    "tvconfig_layers": lambda d: __import__("mechcopy.task_vectors").task_vectors.TaskVectorConfig(layers=(1.5,)),
    "reproduceconfig_nan": lambda d: __import__("mechcopy.reproduce").reproduce.ReproduceConfig(n_eval=float("nan")),
    "trainconfig_lr_nan": lambda d: __import__("mechcopy.organisms.train").organisms.train.TrainConfig(lr=float("nan")),
    "trainconfig_families": lambda d: __import__("mechcopy.organisms.train").organisms.train.TrainConfig(
        families=("nope",)),
    "trainconfig_heads": lambda d: __import__("mechcopy.organisms.train").organisms.train.TrainConfig(
        model_kwargs={"d_model": 96, "n_heads": 5}),
    "train_diverges": lambda d: __import__("mechcopy.organisms.train").organisms.train.train_organism(
        __import__("mechcopy.organisms.train").organisms.train.TrainConfig(
            steps=3, lr=1e30, warmup=0, model_kwargs={"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32,
                                                      "n_ctx": 64}), d / "diverged", progress=False),
    "patch_missing_cache": lambda d: (lambda m: m.run_with_hooks(_tokens(m), fwd_hooks=[
        ("blocks.0.hook_resid_post", __import__("mechcopy.hooks").hooks.patch_from_cache({}))]))(_tiny()),
    "load_organism_list": lambda d: (d.joinpath("org").mkdir(), d.joinpath("org", "organism.json").write_text("[]"),
                                     __import__("mechcopy.organisms.train").organisms.train.load_organism("org")),
    "load_tasks_int": lambda d: __import__("mechcopy.tasks").tasks.load_tasks(5),
    "load_tasks_list": lambda d: __import__("mechcopy.tasks").tasks.load_tasks(["to_upper", 3]),
    # issue 25 part B's functions (main f6bcb98)
    "copy_effect_labels_str": lambda d: _copy_effect(labels="no"),
    "summarize_labels_str": lambda d: __import__("mechcopy.evaluation").evaluation.summarize(
        _label_prompts(), ["no"] * 4, labels="no"),
    "copy_effect_seed": lambda d: _copy_effect(seed=-1),
    "copy_effect_n_boot": lambda d: _copy_effect(n_boot=0),
    "calibrated_str": lambda d: __import__("mechcopy.conditions").conditions.calibrated_conditions(
        [__import__("mechcopy.conditions").conditions.UNPRUNED], "contextual"),
    "calibrated_none": lambda d: __import__("mechcopy.conditions").conditions.calibrated_conditions(
        [__import__("mechcopy.conditions").conditions.UNPRUNED], None),
    "score_labels_str": lambda d: _score_labels(labels="no"),
    "score_labels_batch": lambda d: _score_labels(batch_size=2.5),
    "score_labels_hook": lambda d: _score_labels(fwd_hooks=[
        ("blocks.9.mlp.hook_post", __import__("mechcopy.hooks").hooks.zero_neurons([1]))]),
    "domain_queries_n": lambda d: __import__("mechcopy.scoring").scoring.domain_queries(["a b", "c"], n=1.5),
    "component_sizes_str": lambda d: __import__("mechcopy.pruning").pruning.component_sizes(_tiny(), "abc"),
}


# ------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    kind: str                  # what main 81a615e did: one of KINDS
    what: str                  # the bad input, in words
    run: str                   # the command, or the Python call, as the table shows it
    message: str               # the stable start of the line (or "ExceptionType: message"), or the outcome in words
    disk: Disk = UNCHANGED
    code: int = 2              # exit status of a command row
    call: str | None = None    # a key of API: the call must raise the project's own error
    scenario: Callable | None = None   # scenario(folder, monkeypatch) runs the steps and asserts the outcome
    model: bool = False        # the row may load the model (a refusal that needs it, or a run)
    quoted: bool = True        # quoted in the issue (False: another case of a kind it names)
    part_b: str | None = None  # fixed in part B (on issue 23's core): what it took
    open: str | None = None    # not fixed yet, and why (the row is an xfail until it is)
    skip: Callable[[], str | None] | None = None
    on: str = "81a615e"        # the main whose behaviour `kind` records (f6bcb98: issue 25 part B's functions)

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


#: what fixed the rows of issue 25 part B's functions
API_25B = "issue 25 part B's API checks its arguments with the shared checks"
M = "mechcopy"
EV = f"{M} evaluate: error:"
TI = "--model tiny"
CASES: list[Case] = [
    # ---------------------------------------------------------------- data lost
    Case("data loss", "--out over the copy scores that --prune reads (the neuron file's side file)",
         f"{M} evaluate {TI} --tasks T.json --prune N.json --out N.scores.safetensors --force",
         f"{EV} --out N.scores.safetensors would overwrite the input --prune N.json's side file N.scores.safetensors"),
    Case("data loss", "--out over a built-in task's data in the package",
         f"{M} evaluate {TI} --tasks antonyms --out {{pkg}}/tasks/data/antonyms.json --force",
         f"{EV} --out {{pkg}}/tasks/data/antonyms.json lies in mechcopy's own folder"),
    Case("data loss", "`find --force` over a finished run, killed while writing the neuron file",
         f"{M} find ... --out f.json; {M} find --seed 1 --out f.json --force (Ctrl-C while writing)",
         "f.json and the scores it points at are of one run (a set swapped in half is refused where read)",
         scenario=find_force_swap, model=True,
         part_b="find writes its set under temporary names, then swaps it in, the neuron file last; one run id in all"),
    Case("data loss", "an interrupted `--n 6`, then `--n 5`, then `--n 6`: the journal's rows",
         f"{M} evaluate --n 6 --out r3.json (Ctrl-C); ... --n 5 (Ctrl-C); ... --n 6",
         "the --n 5 run says the journal keeps the --n 6 row; the --n 6 rerun reuses it", scenario=journal_other_n,
         model=True, part_b="a journal keeps rows of other settings, and says so"),
    Case("data loss", "--out over find's attributions beside a neuron file", f"{M} task-vectors {TI} --tasks T.json "
         "--prune N.json --out N.attributions.safetensors --force",
         f"{M} task-vectors: error: --out N.attributions.safetensors would overwrite the input --prune N.json's side "
         "file N.attributions.safetensors", quoted=False),
    Case("data loss", "--out over a neuron file's score metadata", f"{M} patch {TI} --task T.json --neurons N.json "
         "--out N.scores.json --force",
         f"{M} patch: error: --out N.scores.json would overwrite the input --neurons N.json's side file N.scores.json",
         quoted=False),
    Case("data loss", "--out over copy scores kept outside the neuron file's folder (meta scores_path)",
         f"{M} evaluate {TI} --tasks T.json --prune M.json --out elsewhere/S.safetensors --force",
         f"{EV} --out elsewhere/S.safetensors would overwrite the input --prune M.json's side file "
         "elsewhere/S.safetensors", quoted=False),
    Case("data loss", "--out over another run's evaluation journal",
         f"{M} evaluate {TI} --tasks T.json --out r.partial.jsonl --force",
         f"{EV} --out r.partial.jsonl is named like a file mechcopy keeps beside a result and reads back "
         "(*.partial.jsonl); name the result FILE.json", quoted=False),
    Case("data loss", "--out named like find's checkpoint", f"{M} find {TI} --out n.attributions.safetensors --force",
         f"{M} find: error: --out n.attributions.safetensors is named like a file mechcopy keeps beside a result",
         quoted=False),
    Case("data loss", "--out inside a zoo model's cache folder",
         f"{M} evaluate --model smollm2-135m --tasks T.json --out {{cache}}/models/smollm2-135m/config.json --force",
         f"{EV} --out {{cache}}/models/smollm2-135m/config.json would overwrite the input --model "
         "{cache}/models/smollm2-135m", quoted=False),
    Case("data loss", "reproduce --out in the package's task data",
         f"{M} reproduce {TI} --out {{pkg}}/tasks/data --force",
         f"{M} reproduce: error: --out {{pkg}}/tasks/data lies in mechcopy's own folder", quoted=False),
    Case("data loss", "--out over find's probe items (package data)",
         f"{M} find {TI} --out {{pkg}}/tasks/data/probe_items.json --force",
         f"{M} find: error: --out {{pkg}}/tasks/data/probe_items.json lies in mechcopy's own folder", quoted=False),
    # ---------------------------------------------------------------- silently wrong
    Case("silently wrong", "a run interrupted in float32, resumed with `--dtype bfloat16`",
         f"{M} evaluate --out r4.json (Ctrl-C); ... --dtype bfloat16 --out r4.json",
         "nothing reused; the result equals a clean bfloat16 run", scenario=journal_other_dtype, model=True,
         part_b="dtype and device kind in the journal's key"),
    Case("silently wrong", "find interrupted in float32, resumed with `--dtype bfloat16`",
         f"{M} find --out g.json (Ctrl-C); {M} find --dtype bfloat16 --out g.json",
         "the checkpoint is not reused, and the note says the dtype differs", scenario=find_other_dtype, model=True,
         part_b="dtype, device kind and every attribution setting in the checkpoint's identity"),
    Case("silently wrong", "a journal row edited by hand (accuracy 0.999 against its own outcomes)",
         f"{M} evaluate --out r6.json (Ctrl-C); edit r6.partial.jsonl; rerun",
         "the edited row is said and evaluated again", scenario=journal_edited, model=True,
         part_b="every journal row carries a digest of its content, checked on reuse"),
    Case("silently wrong", "a user task named `pooled` (merged into the pooled comparison before)",
         f"{M} evaluate {TI} --tasks pooled.json,T.json --prune N.json",
         f"{EV} pooled.json: the task name 'pooled' is reserved"),
    Case("silently wrong", "a task file with two \"pairs\" keys (the first list ignored before)",
         f"{M} evaluate {TI} --tasks dupkeys.json",
         f"{EV} dupkeys.json: the key 'pairs' appears twice in one object (JSON keeps only the last one); keep one"),
    Case("silently wrong", "a task file with two \"kind\" keys (the second made it a probe)",
         f"{M} evaluate {TI} --tasks dupkind.json", f"{EV} dupkind.json: the key 'kind' appears twice in one object",
         quoted=False),
    Case("silently wrong", "copy scores holding NaN: `select` returned the NaN neurons as the top set",
         "CopyScores.load('nan.scores.safetensors')", "ValueError naming the file and the NaN scores",
         scenario=nan_scores_select, part_b="CopyScores refuses NaN and infinity (also when loaded)"),
    Case("silently wrong", "copy scores of shape 2x4 for a model of 2x64 (bottom baseline)",
         f"{M} evaluate {TI} --tasks T.json --prune shape.json",
         f"{EV} shape.scores.safetensors: copy scores of shape (2, 4), but shape.json names a model of 2 layers of "
         "64 neurons", part_b="the scores' shape checked against the neuron file's fingerprint, before the model loads"),
    Case("silently wrong", "a k grid beyond the model's neurons (`--ks 5,10000000`: dropped without a word)",
         f"{M} find {TI} --n 2 --n-dev 2 --shots 2 --steps 2 --ppl-tokens 64 --ks 2,100000 --out k.json",
         f"{M} find: error: argument --ks: 100000: global top-k on this model can select 1 <= k <= 128", model=True,
         part_b="a grid the user gave is checked whole (errors.FieldError names the field; the CLI its flag)"),
    Case("silently wrong", "held-out text shorter than --ppl-tokens (perplexity of about one token, recorded as 4096)",
         f"{M} find {TI} --text one_word.txt --ppl-tokens 4096 --out p.json",
         "refused, naming --ppl-tokens and the text file", scenario=text_shorter_than_ppl_tokens, model=True,
         part_b="the text's tokens counted before the attribution (evaluation.held_out_ids)"),
    Case("silently wrong", "`perplexity(n_tokens=-5)` (returned 19.99)", "perplexity(tiny, n_tokens=-5)",
         "ValueError: n_tokens must be an integer >= 2, got -5", call="perplexity_minus_5",
         part_b="perplexity checks n_tokens"),
    Case("silently wrong", "--other-task equal to --task (accepted and labelled before)",
         f"{M} patch {TI} --task to_upper --corruption other_task --other-task to_upper --out p.json",
         f"{M} patch: error: --other-task to_upper is the --task to_upper itself"),
    Case("silently wrong", "--other-task a file named like --task", f"{M} patch {TI} --task antonyms.json "
         "--corruption other_task --other-task antonyms --out p.json",
         f"{M} patch: error: --other-task antonyms is the --task antonyms.json itself", quoted=False),
    Case("silently wrong", "`train-organism --lr inf` (exit 0, NaN weights saved before)",
         f"{M} train-organism --lr inf --steps 3 --out org",
         f"{M} train-organism: error: argument --lr: must be a finite number > 0, got 'inf'"),
    Case("silently wrong", "a learning rate that makes training diverge (NaN weights saved before)",
         "train_organism(TrainConfig(steps=3, lr=1e30, ...), out)",
         "ValueError: training diverged at step ", call="train_diverges", quoted=False),
    Case("silently wrong", "prompts built with another separator (`sep=\"|\"`) evaluated with a newline stop",
         "evaluate(model, build_prompts(task, tok, 2, 3, sep='|'))", "the prompts' separator stops generation",
         scenario=separator_stop, part_b="prompts carry their separator (ICLPrompt.sep); the evaluator stops at it"),
    Case("silently wrong", "`scale_neurons([3], nan)`", "scale_neurons([3], float('nan'))",
         "ValueError: factor must be a finite number, got nan", call="scale_neurons_nan"),
    Case("silently wrong", "`summarize(..., n_boot=1)` (a 95% interval of (0.5, 0.5) before)",
         "summarize(prompts, predictions, n_boot=1)",
         "ValueError: n_boot (bootstrap replicates; a 95% interval needs at least 40) must be an integer >= 40, got 1",
         call="summarize_n_boot_1"),
    Case("silently wrong", "a paired comparison from one bootstrap replicate", "paired(x, y, ..., n_boot=1)",
         "ValueError: n_boot (bootstrap replicates; a 95% interval needs at least 40)", call="paired_n_boot_1",
         quoted=False),
    Case("silently wrong", "`set_neurons` with a NaN value (mean ablation)", "set_neurons([1, 2], [0.5, nan])",
         "ValueError: set_neurons values must be finite numbers: 1 of 2 are NaN or infinite", call="set_neurons_nan",
         quoted=False),
    Case("silently wrong", "`inject_vector` of infinities", "inject_vector(torch.full((32,), inf))",
         "ValueError: inject_vector's vector must be finite numbers", call="inject_nan", quoted=False),
    Case("silently wrong", "`NeuronSet` with layer -1 (counted in the last layer before)", "NeuronSet(((-1, 3),), fp)",
         "ValueError: neuron (-1, 3) has a negative layer or index", call="neuronset_layer_minus_1",
         part_b="Components refuses negative layers and indices, and indices past its fingerprint's sizes"),
    Case("silently wrong", "an infinite perplexity bound", f"{M} find {TI} --max-ppl-increase inf --out p.json",
         f"{M} find: error: argument --max-ppl-increase: must be a finite number >= 0.0, got inf", quoted=False),
    # ---------------------------------------------------------------- internal errors
    Case("internal error", "the probe alone with --prune (`missing key 'pooled'` after all rows, no result before)",
         f"{M} evaluate {TI} --tasks copy_probe --prune N.json --n-random 1 --shots 2 --n 4 --out r2.json",
         "no pooled comparison: every task is the probe the neurons were chosen on", code=0, model=True,
         disk=json_at("r2.json", lambda r: "copy_probe" in r["comparisons"], "`r2.json` with the per-task comparisons")),
    Case("internal error", "a model folder whose config.json is `[]`", f"{M} evaluate --model listcfg --tasks T.json",
         f"{EV} listcfg/config.json",
         part_b="--model's folder has its config.json read (models.loading.folder_config) before the model loads"),
    Case("internal error", "a task file of 100,000 nested brackets", f"{M} evaluate {TI} --tasks deep.json",
         f"{EV} deep.json: its JSON is nested too deeply to read; check the file"),
    Case("internal error", "`train-organism --max-minutes 1e-9` (a crash after zero steps before)",
         f"{M} train-organism --max-minutes 1e-9 --steps 5 --out org",
         "transformer-s0: stopped early: time budget of 1e-09 min reached after 1 steps", code=0, model=True,
         disk=only("org/model.safetensors", "org/organism.json", "org/loss.json", "org/loss.png",
                   words="the organism after one step")),
    Case("internal error", "`--model-kwargs '{\"d_model\": 0}'`", f"{M} train-organism --steps 3 --model-kwargs '{{\"d_model\": 0}}'",
         f"{M} train-organism: error: --model-kwargs: d_model must be an integer >= 1, got 0"),
    Case("internal error", "`--model-kwargs '{\"n_heads\": 5}'` with d_model 96",
         f"{M} train-organism --steps 3 --model-kwargs '{{\"n_heads\": 5, \"d_model\": 96}}'",
         f"{M} train-organism: error: --model-kwargs: n_heads 5 must divide d_model 96"),
    Case("internal error", "an unknown model size", f"{M} train-organism --steps 3 --model-kwargs '{{\"d_modle\": 96}}'",
         f"{M} train-organism: error: --model-kwargs: unknown size 'd_modle' for a transformer; known: n_layers,",
         quoted=False),
    Case("internal error", "a context shorter than the training sequences",
         f"{M} train-organism --steps 3 --model-kwargs '{{\"n_ctx\": 16}}'",
         f"{M} train-organism: error: --model-kwargs: n_ctx 16 is shorter than the longest training sequence",
         quoted=False),
    Case("internal error", "a Mamba state size of 0", f"{M} train-organism --arch mamba --steps 3 --model-kwargs '{{\"d_state\": 0}}'",
         f"{M} train-organism: error: --model-kwargs: d_state must be an integer >= 1, got 0", quoted=False),
    # ---------------------------------------------------------------- raw API exceptions
    Case("raw API exception", "`load_model(device=\"cuda\")` on a CPU build", "load_model(folder, device='cuda')",
         "ValueError", call="load_model_cuda", skip=_no_cuda,
         part_b="load_model checks device with the --device flag's check (errors.check_device)"),
    Case("raw API exception", "`load_model(dtype=\"float32\")`, a string", "load_model(folder, dtype='float32')",
         "TypeError", call="load_model_dtype_str",
         part_b="load_model checks dtype (errors.check_dtype); the flag names it, the API takes the dtype"),
    Case("raw API exception", "`build_prompts(k=2.5)`", "build_prompts(task, tok, 2.5)",
         "TypeError: shots must be an integer >= 0, got 2.5", call="build_prompts_2_5"),
    Case("raw API exception", "`evaluate(n_boot=0)`", "evaluate(tiny, prompts, n_boot=0)",
         "ValueError: n_boot (bootstrap replicates; a 95% interval needs at least 40) must be an integer >= 40, got 0",
         call="evaluate_n_boot_0"),
    Case("raw API exception", "an unknown hook name in `evaluate`",
         "evaluate(tiny, prompts, fwd_hooks=[('blocks.9.mlp.hook_post', zero_neurons([1]))])",
         "ValueError: the model has no hook point 'blocks.9.mlp.hook_post'", call="unknown_hook_evaluate",
         part_b="predict, evaluate and perplexity call hooks.check_hook_points"),
    Case("raw API exception", "an unknown hook name, checked", "check_hook_points(tiny, [('blocks.9.mlp.hook_post', h)])",
         "ValueError: the model has no hook point 'blocks.9.mlp.hook_post' (it has", call="unknown_hook_check",
         quoted=False),
    Case("raw API exception", "a wrong-size `inject_vector`",
         "tiny.run_with_hooks(tokens, fwd_hooks=[('blocks.0.hook_resid_post', inject_vector(torch.zeros(7)))])",
         "ValueError: inject_vector: the vector has shape (7,), but the activation at blocks.0.hook_resid_post has 32 "
         "values per position", call="inject_wrong_size"),
    Case("raw API exception", "an `inject_vector` position past the prompt",
         "tiny.run_with_hooks(tokens, fwd_hooks=[(site, inject_vector(torch.zeros(32), 99))])",
         "IndexError: inject_vector: position [99] out of range at blocks.0.hook_resid_post", call="inject_position",
         quoted=False),
    Case("raw API exception", "patching from a cache that lacks the hook point (a bare KeyError before)",
         "tiny.run_with_hooks(tokens, fwd_hooks=[(site, patch_from_cache({}))])",
         "ValueError: patch_from_cache: the cache holds no activation at blocks.0.hook_resid_post",
         call="patch_missing_cache", quoted=False),
    Case("raw API exception", "an organism folder whose organism.json is `[]`", "load_organism('org')",
         "ValueError: org/organism.json is not an organism's description", call="load_organism_list", quoted=False,
         disk=only("org/organism.json", words="only the test's organism.json")),
    Case("raw API exception", "a factor that is a string", "scale_neurons([3], '2')",
         "TypeError: factor must be a finite number, got '2'", call="scale_neurons_str", quoted=False),
    Case("raw API exception", "an interval level of 2", "bootstrap_ci(values, alpha=2.0)",
         "ValueError: alpha must lie in (0, 1), got 2.0", call="bootstrap_alpha", quoted=False),
    Case("raw API exception", "a seed of 2**64 in FindConfig", "FindConfig(seed=2**64)",
         "ValueError: seed must be an integer <= 2**63 - 1", call="findconfig_seed", quoted=False),
    Case("raw API exception", "an infinite bound in FindConfig", "FindConfig(max_ppl_increase=inf)",
         "ValueError: max_ppl_increase must be a finite number, got float inf", call="findconfig_inf", quoted=False),
    Case("raw API exception", "a number as FindConfig's text file", "FindConfig(text=123)",
         "TypeError: text must be a string, got int 123", call="findconfig_text_int", quoted=False),
    Case("raw API exception", "a fractional task-vector layer", "TaskVectorConfig(layers=(1.5,))",
         "TypeError: layers item 0 must be an integer, got tuple (1.5,)", call="tvconfig_layers", quoted=False),
    Case("raw API exception", "NaN as a count in ReproduceConfig", "ReproduceConfig(n_eval=nan)",
         "TypeError: n_eval must be an integer, got float nan", call="reproduceconfig_nan", quoted=False),
    Case("raw API exception", "NaN as a learning rate", "TrainConfig(lr=nan)",
         "ValueError: lr must be a finite number, got float nan", call="trainconfig_lr_nan", quoted=False),
    Case("raw API exception", "an unknown task family", "TrainConfig(families=('nope',))",
         "ValueError: families must name some of map, shift, class, got ['nope']", call="trainconfig_families",
         quoted=False),
    Case("raw API exception", "heads that do not divide d_model", "TrainConfig(model_kwargs={'d_model': 96, 'n_heads': 5})",
         "ValueError: model_kwargs: n_heads 5 must divide d_model 96", call="trainconfig_heads", quoted=False),
    Case("raw API exception", "a number as the task list", "load_tasks(5)",
         "TypeError: tasks must be 'all', a comma-separated string of names or files, or a list of them, got int 5",
         call="load_tasks_int", quoted=False),
    Case("raw API exception", "a number in a task list", "load_tasks(['to_upper', 3])",
         "TypeError: tasks must be task names or task files, got 3", call="load_tasks_list", quoted=False),
    # ---------------------------------------------------------------- late refusals
    Case("late refusal", "more shots than the task has pairs (after a 10 s model load before)",
         f"{M} evaluate {TI} --tasks T.json --shots 12",
         f"{EV} --shots 12: task 'twelve' has 12 distinct pairs, and 12 shots need at least 13"),
    Case("late refusal", "a neuron index -1", f"{M} evaluate {TI} --tasks T.json --prune neg.json",
         f"{EV} neg.json: neuron (-1, 3) has a negative layer or index", part_b="checked when the file is read"),
    Case("late refusal", "a layer beyond the neuron file's own fingerprint",
         f"{M} evaluate {TI} --tasks T.json --prune beyond.json",
         f"{EV} beyond.json: neuron (5, 3) is out of range: the model the set names has 2 layers of 64 neurons",
         part_b="checked against the sizes the file's fingerprint records, when it is read"),
    Case("late refusal", "`--max-completeness-error 0` (refused after the whole attribution before)",
         f"{M} find {TI} --max-completeness-error 0 --out p.json",
         f"{M} find: error: argument --max-completeness-error: must be a finite number > 0.0, got 0.0",
         part_b="a strict bound in FindConfig.MINIMUM (errors.Above), so the flag checks it too"),
    Case("late refusal", "`find --n 100000` on the probe", f"{M} find {TI} --n 100000 --out p.json",
         f"{M} find: error: --n + --n-dev = 100050 probe prompts, but the 'mixed' items give at most"),
    Case("late refusal", "more shots than the balanced probe has other labels", f"{M} find {TI} --shots 6 --out p.json",
         f"{M} find: error: --shots 6: a balanced probe gives each prompt `shots` distinct non-gold labels", quoted=False),
    Case("late refusal", "reproduce's probe too small for --find-n", f"{M} reproduce {TI} --find-n 100000 --out run",
         f"{M} reproduce: error: --find-n + --find-n-dev = 100050 probe prompts", quoted=False),
    Case("late refusal", "task vectors with more shots than pairs", f"{M} task-vectors {TI} --tasks T.json --shots 12",
         f"{M} task-vectors: error: --shots 12: task 'twelve' has 12 distinct pairs", quoted=False),
    Case("late refusal", "patching with more shots than pairs", f"{M} patch {TI} --task T.json --shots 12 --out p.json",
         f"{M} patch: error: --shots 12: task 'twelve' has 12 distinct pairs", quoted=False),
    Case("late refusal", "a seed of 2**64 (\"Overflow when unpacking long long\" after the load before)",
         f"{M} evaluate {TI} --tasks T.json --seed 18446744073709551616",
         f"{EV} argument --seed: must be an integer <= 2**63 - 1 (9223372036854775807), got 18446744073709551616"),
    Case("late refusal", "find's seed of 2**64", f"{M} find {TI} --seed 18446744073709551616 --out p.json",
         f"{M} find: error: argument --seed: must be an integer <= 2**63 - 1", quoted=False),
    Case("late refusal", "patch's seed of 2**64", f"{M} patch {TI} --task T.json --seed 18446744073709551616 --out p.json",
         f"{M} patch: error: argument --seed: must be an integer <= 2**63 - 1", quoted=False),
    Case("late refusal", "an organism's seed of 2**64", f"{M} train-organism --steps 3 --seed 18446744073709551616",
         f"{M} train-organism: error: argument --seed: must be an integer <= 2**63 - 1", quoted=False),
    # ---------------------------------------------------------------- unclear messages
    Case("unclear message", "`--text /dev/null` (\"does not exist\" before)", f"{M} find {TI} --text /dev/null --out p.json",
         f"{M} find: error: argument --text: text file /dev/null is a character device, not a file"),
    Case("unclear message", "a folder as --text (\"does not exist\" before)", f"{M} find {TI} --text folder --out p.json",
         f"{M} find: error: argument --text: text file folder is a folder, not a file"),
    Case("unclear message", "a task file named `a,b.json` (\"task file a does not exist\" before)",
         f"{M} evaluate {TI} --tasks a,b.json --shots 2 --n 2 --out r2.json", "wrote r2.json", code=0, model=True,
         disk=json_at("r2.json", lambda r: r["settings"]["tasks"] == ["ab"], "`r2.json` with the task `ab`")),
    Case("unclear message", "a file with a comma in a list of tasks",
         f"{M} evaluate {TI} --tasks to_upper,a,b.json --shots 2 --n 2 --out r2.json", "wrote r2.json", code=0,
         model=True, quoted=False,
         disk=json_at("r2.json", lambda r: r["settings"]["tasks"] == ["to_upper", "ab"], "`r2.json` with both tasks")),
    Case("unclear message", "a null journal row (\"'NoneType' object is not subscriptable\" on every rerun)",
         f"{M} evaluate --out r7.json (Ctrl-C); set its journal row to null; rerun",
         "the row is said (naming r7.partial.jsonl) and evaluated again", scenario=journal_null_row, model=True,
         part_b="journal lines checked on reading"),
    Case("unclear message", "`find` resumed with another --rule (\"cannot join attributions\" on every rerun)",
         f"{M} find --out h.json (Ctrl-C); {M} find --rule midpoint --out h.json",
         "starts over, naming the checkpoint and the setting that differs", scenario=find_other_rule, model=True,
         part_b="every attribution setting in the checkpoint's identity"),
    Case("unclear message", "/dev/null as a neuron file (\"does not exist\" before)",
         f"{M} evaluate {TI} --tasks T.json --prune /dev/null",
         f"{EV} neuron file /dev/null is a character device, not a file", quoted=False),
    Case("unclear message", "/dev/null as a task file", f"{M} evaluate {TI} --tasks /dev/null",
         f"{EV} task file /dev/null is a character device, not a file", quoted=False),
    Case("unclear message", "a folder named like a task file", f"{M} evaluate {TI} --tasks fold.json",
         f"{EV} task file fold.json is a folder, not a file", quoted=False),
    # ---- issue 25 part B's functions, as main f6bcb98 had them (found after the merge)
    Case("silently wrong", "a string as the copy effect's label set (its letters were the labels)",
         "copy_effect(prompts, predictions, labels='no')",
         "TypeError: labels must be a list of str (the task's label set, Task.label_set()), got str 'no'",
         call="copy_effect_labels_str", quoted=False, on="f6bcb98", part_b=API_25B),
    Case("silently wrong", "a string as summarize's label set", "summarize(prompts, predictions, labels='no')",
         "TypeError: labels must be a list of str", call="summarize_labels_str", quoted=False, on="f6bcb98",
         part_b=API_25B),
    Case("unclear message", "a string as the calibrations (\"unknown calibration 'c'\" before)",
         "calibrated_conditions([UNPRUNED], 'contextual')",
         "TypeError: calibrations must be a list of str (e.g. ['contextual', 'batch']), got str 'contextual'",
         call="calibrated_str", quoted=False, on="f6bcb98", part_b=API_25B),
    Case("unclear message", "a string as label scoring's labels (\"not among the labels ['n', 'o']\" before)",
         "score_labels(tiny, prompts, 'no')", "TypeError: labels must be a list of str (task.require_labels()), got "
         "str 'no'", call="score_labels_str", quoted=False, on="f6bcb98", part_b=API_25B),
    Case("raw API exception", "None as the calibrations", "calibrated_conditions([UNPRUNED], None)",
         "TypeError: calibrations must be a list of str", call="calibrated_none", quoted=False, on="f6bcb98",
         part_b=API_25B),
    Case("raw API exception", "a fractional batch size in label scoring", "score_labels(tiny, prompts, labels, "
         "batch_size=2.5)", "TypeError: batch_size must be an integer >= 1, got 2.5", call="score_labels_batch",
         quoted=False, on="f6bcb98", part_b=API_25B),
    Case("raw API exception", "an unknown hook name in label scoring (a bare KeyError before)",
         "score_labels(tiny, prompts, labels, fwd_hooks=[('blocks.9.mlp.hook_post', h)])",
         "ValueError: the model has no hook point 'blocks.9.mlp.hook_post'", call="score_labels_hook", quoted=False,
         on="f6bcb98", part_b=API_25B),
    Case("raw API exception", "a negative seed for the copy effect (numpy's error before)",
         "copy_effect(prompts, predictions, labels, seed=-1)", "ValueError: seed must be an integer >= 0, got -1",
         call="copy_effect_seed", quoted=False, on="f6bcb98", part_b=API_25B),
    Case("raw API exception", "no bootstrap replicates for the copy effect", "copy_effect(..., n_boot=0)",
         "ValueError: n_boot (bootstrap replicates; a 95% interval needs at least 40) must be an integer >= 40",
         call="copy_effect_n_boot", quoted=False, on="f6bcb98", part_b=API_25B),
    Case("raw API exception", "a fractional number of domain queries", "domain_queries(inputs, n=1.5)",
         "TypeError: n must be an integer >= 1, got 1.5", call="domain_queries_n", quoted=False, on="f6bcb98",
         part_b=API_25B),
    Case("raw API exception", "a string as size matching's reference prompts (an AttributeError before)",
         "component_sizes(tiny, 'abc')", "TypeError: prompts must be a list of ICLPrompts", call="component_sizes_str",
         quoted=False, on="f6bcb98", part_b=API_25B),
]


# ------------------------------------------------------------------------------------------- running a row


def _params():
    for i, case in enumerate(CASES, 1):
        marks = [pytest.mark.xfail(reason=f"open: {case.open}", strict=False)] if case.open else []
        yield pytest.param(case, id=f"{i:02d}", marks=marks)


@pytest.fixture
def protect_package():
    """Whatever a failing row does, the package's task data is put back."""
    data = PACKAGE / "tasks" / "data"
    saved = {p: p.read_bytes() for p in data.iterdir() if p.is_file()}
    yield
    for p in data.iterdir():
        if p.is_file() and p not in saved:
            p.unlink()
    for p, content in saved.items():
        if not p.exists() or p.read_bytes() != content:
            p.write_bytes(content)


@pytest.mark.parametrize("case", list(_params()))
def test_case(case: Case, tmp_path, monkeypatch, capsys, one_thread, protect_package):
    import mechcopy.models
    from mechcopy.errors import own_error
    from mechcopy.models import zoo
    from mechcopy.models.zoo import ZOO

    if case.skip and case.skip():
        pytest.skip(case.skip())
    real = mechcopy.models.load_model

    def load(name, device=None, dtype=None, **kw):
        if not case.model:
            raise ModelLoaded(f"the model loaded although the row must be refused before ({name})")
        assert str(name) not in ZOO, "a row must not load a real model"
        return _tiny(dtype or torch.float32) if name == "tiny" else real(name, device=device, dtype=dtype, **kw)

    monkeypatch.setattr(mechcopy.models, "load_model", load)
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    make_more(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    sub = {"{pkg}": str(PACKAGE), "{cache}": str(tmp_path / "cache")}
    run, message = case.run, case.message
    for k, v in sub.items():
        run, message = run.replace(k, v), message.replace(k, v)
    if case.scenario:
        case.scenario(tmp_path, monkeypatch)
        return
    if case.call:
        with pytest.raises(Exception) as info:
            API[case.call](tmp_path)
        got = f"{type(info.value).__name__}: {info.value}"
        assert own_error(info.value), f"not the project's own error: {got}"
        assert got.startswith(message), got
        assert case.disk.check(tmp_path, before), case.disk.words
        return
    code = cli(*shlex.split(run)[1:])
    code, out, err = code
    lines = [line.strip() for line in re.split(r"[\r\n]", out + err)]
    assert code == case.code, f"exit {code}:\n{out}\n{err}"
    assert any(line.startswith(message) for line in lines), f"no line starts with {message!r}:\n{out}\n{err}"
    if code == 2:
        assert len(err.splitlines()) == 1 and "internal error" not in err and "unexpected" not in err, err
    assert case.disk.check(tmp_path, before), case.disk.words


# ------------------------------------------------------------------------------------------- the kinds, generated


INTEGER_TYPES = ("at_least_0", "at_least_1", "at_least_2", "int_list")


def _options(kinds):
    """(command, flag, type) of every option whose argparse type is one of `kinds` (by name)."""
    from mechcopy.commands import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    return [(name, action.option_strings[0], action.type) for name, p in sub.items() for action in p._actions
            if action.option_strings and getattr(action.type, "__name__", "").startswith(kinds)
            and not (kinds == INTEGER_TYPES and "." in action.type.__name__)]


@pytest.mark.parametrize("command, flag, kind", _options(("at_least_0.", "at_least_1.", "positive")),
                         ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_number_flag_refuses_nan_and_inf(command, flag, kind, value, capsys):
    """Every flag that takes a real number refuses NaN and infinity, by name, before anything loads."""
    from mechcopy.commands import main

    assert main([command, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mechcopy {command}: error: argument {flag}: must be a finite number"), err


@pytest.mark.parametrize("command, flag, kind", _options(INTEGER_TYPES), ids=lambda x: x if isinstance(x, str) else "")
def test_every_integer_flag_refuses_2_to_the_64(command, flag, kind, capsys):
    """Every integer flag refuses a value beyond 2**63 - 1 (what torch and numpy hold), by name."""
    from mechcopy.commands import main

    assert main([command, flag, str(2**64)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mechcopy {command}: error: argument {flag}:"), err


def _config_fields():
    from mechcopy.find import FindConfig
    from mechcopy.organisms.train import TrainConfig
    from mechcopy.reproduce import ReproduceConfig
    from mechcopy.task_vectors import TaskVectorConfig

    for cls in (FindConfig, ReproduceConfig, TaskVectorConfig, TrainConfig):
        for name, low in cls.MINIMUM.items():
            yield pytest.param(cls, name, low, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("cls, name, low", list(_config_fields()))
def test_every_config_refuses_what_its_flag_refuses(cls, name, low):
    """The API refuses what the flags refuse: NaN, infinity, 2**64, below the bound, a string; by the field's name."""
    from dataclasses import fields

    from mechcopy.errors import own_error

    is_tuple = "tuple" in str(next(f.type for f in fields(cls) if f.name == name))
    bad = [float("nan"), float("inf"), 2**64, "5", low - 1] if isinstance(low, float) or not is_tuple else \
        [(2**64,), (low - 1,), ("5",)]
    if isinstance(low, float):
        bad.remove(2**64)
    for value in bad:
        with pytest.raises((ValueError, TypeError)) as info:
            cls(**{name: value})
        assert own_error(info.value) and str(info.value).startswith(name), (value, info.value)


# ------------------------------------------------------------------------------------------- the doc

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
START, END = "<!-- hostile:start -->", "<!-- hostile:end -->"


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render_table() -> str:
    """The doc's table of this file's rows, and their counts by kind."""
    counts = ["| kind (what main 81a615e did, or f6bcb98 for issue 25 part B's functions) | rows | quoted in the issue "
              "| fixed in part A | fixed in part B | open |",
              "|---|---|---|---|---|---|"]
    for kind, rows in [(k, [c for c in CASES if c.kind == k]) for k in KINDS] + [("all", CASES)]:
        counts.append(f"| {kind} | {len(rows)} | {sum(c.quoted for c in rows)} | "
                      f"{sum(not c.part_b and not c.open for c in rows)} | {sum(bool(c.part_b) for c in rows)} | "
                      f"{sum(bool(c.open) for c in rows)} |")
    rows = ["Source: the rows of `tests/test_hostile.py`, one test each (`python tests/test_hostile.py` writes them "
            "here).", "",
            "| # | kind | bad input | command or call | what it gets (stable start) | status |",
            "|---|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        got = _code(c.message) if c.call or (not c.scenario and c.code == 2) else c.message
        exit_note = "" if c.call or c.scenario or c.code == 2 else f" (exit {c.code})"
        status = (f"open: {c.open}" if c.open else f"fixed in part B: {c.part_b}" if c.part_b else "fixed in part A") \
            + ("" if c.quoted else " (a kind)") + ("" if c.on == "81a615e" else f" (found on main {c.on})")
        rows.append(f"| {i} | {c.kind} | {c.what} | {_code(c.run)} | {got}{exit_note} | {status} |")
    return "\n".join(counts) + "\n\n" + "\n".join(rows)


def test_doc_table_is_current():
    text = DOC.read_text()
    table = text[text.index(START) + len(START):text.index(END)].strip()
    assert table == render_table(), "docs/reliability.md is stale: run `python tests/test_hostile.py`"


if __name__ == "__main__":
    text = DOC.read_text()
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    DOC.write_text(f"{head}\n{render_table()}\n{tail}")
    print(f"wrote {len(CASES)} rows to {DOC}")
