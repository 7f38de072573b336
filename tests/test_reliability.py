"""Bad input gets a clear error before any work, and nothing is lost: every row of the table in
docs/reliability.md, run.

The cases live here; the doc's table is generated from them (`python tests/test_reliability.py`
rewrites it) and `test_doc_table_is_current` fails when the two differ, so they cannot drift. Each
command row runs in-process (`mechcopy.commands.main`) in a fresh folder holding the files below,
with `--model tiny` standing for the tiny random transformer (2 layers of 64 neurons, a 512-token
context, character tokens); naming any zoo model in a row fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from jaxtyping import TypeCheckError

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
START, END = "<!-- cases:start -->", "<!-- cases:end -->"
WORDS = ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx")


# ------------------------------------------------------------------------------------------- the files


def _fingerprint():
    from mechcopy.models.tiny import tiny_transformer
    from mechcopy.neurons import model_fingerprint

    return model_fingerprint(tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0))


def _task(name: str, pairs) -> str:
    return json.dumps({"name": name, "pairs": [list(p) for p in pairs]})


def _neurons(fp: dict, neurons, **meta) -> str:
    return json.dumps({"model": fp, "neurons": neurons, "meta": meta})


def make_files(folder: Path) -> None:
    """The inputs every row may use (names as in the table)."""
    fp = _fingerprint()
    upper = [(w, w.upper()) for w in WORDS[:8]]
    files = {
        "t.json": _task("upper", upper),
        "r.json": '{"old": "result"}',
        "text.txt": "Some held-out text for perplexity. " * 20,
        "bad.json": json.dumps({"name": "bad", "pairs": [["ab", "AB"], ["cd", 3]]}),
        "antonyms.json": _task("antonyms", upper),
        "long.json": _task("long", [(c * 150, c.upper()) for c in "abcdefgh"]),
        "dup.json": _task("dup", upper + upper[:2]),
        "amb.json": _task("amb", upper + [("ab", "BA")]),
        "small.json": _task("small", [(w, w[0].upper()) for w in WORDS]),
        "open.json": json.dumps({"name": "open", "pairs": [list(p) for p in upper], "closed": False}),
        "n.json": _neurons(fp, [[0, 1], [1, 2]]),
        "other.json": _neurons({**fp, "name": "smollm2-135m", "n_layers": 30, "d_model": 576,
                                "neurons_per_layer": 1536}, [[0, 1]]),
        "hash.json": _neurons({**fp, "weight_hash": "0" * 16}, [[0, 1]]),
        "floats.json": _neurons(fp, [[1.9, 3.7]]),
        "strs.json": _neurons(fp, [["10", 1]]),
        "bools.json": _neurons(fp, [[True, 1]]),
        "nomodel.json": json.dumps({"model": {}, "neurons": [[0, 1]]}),
        "null.json": json.dumps({"model": fp, "neurons": None}),
        "oor.json": _neurons(fp, [[0, 64]]),
        "empty.json": _neurons(fp, []),
        "k0.json": _neurons(fp, [], k=0, why="no k improves dev accuracy over the unpruned model"),
        "moved.json": _neurons(fp, [[0, 1]], scores_path="/gone/moved.scores.safetensors"),
        "junk.json": _neurons(fp, [[0, 1]], scores_path="junk.scores.safetensors"),
        "junk.scores.safetensors": "not a safetensors file",
        "n.attributions.safetensors": "not a safetensors file",
        "n.partial.safetensors": "not a safetensors file",
        "full/notes.txt": "someone else's file",
        "mymodel/config.json": "{}",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for name in ("folder", "empty_dir"):
        (folder / name).mkdir()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- disk states


@dataclass(frozen=True)
class Disk:
    """What is on disk after a row (in words for the doc) and the check of it."""

    words: str
    check: Callable[[Path, dict], bool]


UNCHANGED = Disk("nothing written; every input unchanged", lambda d, before: snapshot(d) == before)


def only(*names: str, words: str, gone: tuple[str, ...] = ()) -> Disk:
    """Inputs unchanged; the files `names` new (or replaced), the files `gone` removed."""
    def check(d: Path, before: dict) -> bool:
        after = snapshot(d)
        changed = {k for k in after if before.get(k) != after[k]}
        return changed == set(names) and set(before) - set(after) == set(gone)

    return Disk(words, check)


def json_at(name: str, test: Callable[[dict], bool], words: str) -> Disk:
    return Disk(words, lambda d, before: test(json.loads((d / name).read_text())))


def partial_rows(name: str, n: int) -> Disk:
    def check(d: Path, before: dict) -> bool:
        lines = (d / name).read_text().splitlines()
        return len(lines) == n and not (d / "r2.json").exists()

    return Disk(f"`{name}` holds the {n} finished (task, condition) rows; no result file", check)


# ------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    what: str                 # the bad input, in words
    run: str                  # the command, or the Python call, as the doc shows it
    message: str              # the stable start of the message (the line on stderr, or the exception)
    disk: Disk = UNCHANGED
    code: int = 2             # exit status of a command row
    call: Callable | None = None          # a Python call row: call(folder) must raise
    patch: Callable | None = None         # patch(monkeypatch, folder) before the row runs (Ctrl-C, ...)
    skip: Callable[[], str | None] | None = None

    @property
    def is_command(self) -> bool:
        return self.call is None


def _interrupt_after(target: str, n_calls: int):
    """Ctrl-C on the n-th call of `target` (module.function, or module.Class.method), as if the user
    pressed it there."""
    def patch(monkeypatch, folder):
        import importlib

        parts, mod, cut = target.split("."), None, 1
        for i in range(1, len(parts)):
            try:
                mod, cut = importlib.import_module(".".join(parts[:i])), i
            except ImportError:
                break
        for attr in parts[cut:-1]:
            mod = getattr(mod, attr)
        name = parts[-1]
        real, calls = getattr(mod, name), []

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == n_calls:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)

    return patch


def _sweep_must_not_run(monkeypatch, folder):
    import mechcopy.patching

    def boom(*a, **k):
        raise AssertionError("the patching sweep ran before the neuron file was checked")

    monkeypatch.setattr(mechcopy.patching, "patch_sweep", boom)


def _hostile(folder: Path) -> Path:
    """A model folder whose config asks transformers to run its code (which would leave a marker)."""
    d = folder / "hostile"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    code = f"import pathlib\npathlib.Path({str(folder / 'RAN')!r}).write_text('hostile code ran')\n"
    for f in ("configuration_evil.py", "modeling_evil.py"):
        (d / f).write_text(code)
    return d


def _load_hostile(folder: Path):
    import builtins

    from mechcopy import load_model

    d = _hostile(folder)
    real_input = builtins.input
    builtins.input = lambda *a: "y"   # a user who presses y when transformers asks
    try:
        load_model(d)
    finally:
        builtins.input = real_input


def _long_prompt(folder: Path):
    from mechcopy.attribution import integrated_gradients
    from mechcopy.models.tiny import tiny_transformer
    from mechcopy.tasks import load_task
    from mechcopy.tasks.prompts import make_prompt

    model = tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0)
    pairs = load_task(str(folder / "long.json")).pairs
    integrated_gradients(model, [make_prompt(pairs[:4], pairs[4], model.tokenizer, task="long")], steps=2)


def _summarize_wrong_length(folder: Path):
    from mechcopy.evaluation import summarize
    from mechcopy.models.tiny import char_tokenizer
    from mechcopy.tasks import load_task
    from mechcopy.tasks.prompts import build_prompts

    prompts = build_prompts(load_task(str(folder / "t.json")), char_tokenizer(), shots=2, n=2)
    summarize(prompts, ["AB", "CD", "EF"])


def _zoo_manifest_without_files(folder: Path):
    from mechcopy.models import zoo

    d = folder / "cache" / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / zoo.MANIFEST).write_text(json.dumps({"name": "smollm2-135m"}))
    os.environ[zoo.CACHE_ENV] = str(folder / "cache")
    try:
        raise ValueError(zoo.cache_problem("smollm2-135m"))
    finally:
        del os.environ[zoo.CACHE_ENV]


def _truncated_cache(monkeypatch, folder):
    from mechcopy.models import zoo

    d = folder / "cache" / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / zoo.WEIGHTS).write_bytes(b"\0" * 10)
    (d / zoo.MANIFEST).write_text(json.dumps({"files": {zoo.WEIGHTS: {"size": 1000, "sha256": "0" * 64}}}))
    monkeypatch.setenv(zoo.CACHE_ENV, str(folder / "cache"))


def _no_cuda() -> str | None:
    import torch

    return "this machine has CUDA" if torch.cuda.is_available() else None


def _call(text: str, fn: Callable) -> dict:
    return {"run": text, "call": fn}


M = "mechcopy"
EV = f"{M} evaluate: error:"
FIND = f"{M} find --model tiny --n 2 --n-dev 2 --shots 2 --steps 2 --ks 2 --ppl-tokens 64"
TV = f"{M} task-vectors --model tiny --n-extract 2 --n-dev 2 --n-test 4"
CASES: list[Case] = [
    # ---- flags: refused by argparse, before anything loads
    Case("a count of zero", f"{M} evaluate --n 0", f"{EV} argument --n: must be an integer >= 1, got 0"),
    Case("a negative seed (refused only after the model load before)", f"{M} evaluate --seed -1",
         f"{EV} argument --seed: must be an integer >= 0, got -1"),
    Case("negative shots", f"{M} evaluate --shots -2", f"{EV} argument --shots: must be an integer >= 0, got -2"),
    Case("a negative number of random sets", f"{M} evaluate --prune n.json --n-random -3",
         f"{EV} argument --n-random: must be an integer >= 0, got -3"),
    Case("zero threads", f"{M} evaluate --threads 0", f"{EV} argument --threads: must be an integer >= 1, got 0"),
    Case("a device this machine lacks (an AssertionError traceback before)", f"{M} evaluate --device cuda",
         f"{EV} argument --device: CUDA is not available on this machine; use --device cpu", skip=_no_cuda),
    Case("an unknown device", f"{M} evaluate --device tpu", f"{EV} argument --device: unknown device 'tpu'; use cpu or cuda"),
    Case("`find --n 0` (`list index out of range` before)", f"{M} find --out n2.json --n 0",
         f"{M} find: error: argument --n: must be an integer >= 1, got 0"),
    Case("a negative checkpoint interval", f"{M} find --out n2.json --checkpoint-every -1",
         f"{M} find: error: argument --checkpoint-every: must be an integer >= 1, got -1"),
    Case("a k grid that is not a list of integers (`invalid literal for int()` before)", f"{M} find --out n2.json --ks abc",
         f"{M} find: error: argument --ks: expected comma-separated integers >= 1 such as 5,10,20, got 'abc'"),
    Case("k = 0 in the grid", f"{M} find --out n2.json --ks 5,0",
         f"{M} find: error: argument --ks: expected comma-separated integers >= 1 such as 5,10,20, got '5,0'"),
    Case("a perplexity bound that is not a number", f"{M} find --out n2.json --max-ppl-increase nan",
         f"{M} find: error: argument --max-ppl-increase: must be a finite number >= 0.0, got nan"),
    Case("a missing text file (read after the attribution before)", f"{M} find --out n2.json --text missing.txt",
         f"{M} find: error: argument --text: text file missing.txt does not exist"),
    Case("`reproduce --find-n 0` (`list index out of range` before)", f"{M} reproduce --find-n 0",
         f"{M} reproduce: error: argument --find-n: must be an integer >= 1, got 0"),
    Case("`patch --n 0` (`stack expects a non-empty TensorList` before)", f"{M} patch --task t.json --out p.json --n 0",
         f"{M} patch: error: argument --n: must be an integer >= 1, got 0"),
    Case("one shot for shuffled labels", f"{M} patch --task t.json --out p.json --shots 1",
         f"{M} patch: error: --corruption shuffled_labels permutes the demo labels: it needs --shots >= 2, got 1"),
    Case("--other-task without --corruption other_task", f"{M} patch --task t.json --out p.json --other-task to_upper",
         f"{M} patch: error: --other-task is used only with --corruption other_task"),
    Case("`task-vectors --n-extract 0` (exit 0 with no results before)", f"{M} task-vectors --n-extract 0",
         f"{M} task-vectors: error: argument --n-extract: must be an integer >= 1, got 0"),
    Case("a layer list with a word in it", f"{M} task-vectors --layers 1,x",
         f"{M} task-vectors: error: argument --layers: expected comma-separated integers >= 0 such as 5,10,20, got '1,x'"),
    Case("`--batch-size 0` (`max() arg is an empty sequence` before)", f"{M} train-organism --batch-size 0",
         f"{M} train-organism: error: argument --batch-size: must be an integer >= 1, got 0"),
    Case("a negative learning rate", f"{M} train-organism --lr -1",
         f"{M} train-organism: error: argument --lr: must be a finite number > 0, got '-1'"),
    Case("model sizes that are not JSON", f"{M} train-organism --model-kwargs '{{d_model: 96}}'",
         f"{M} train-organism: error: --model-kwargs is not valid JSON"),
    # ---- tasks
    Case("a task listed twice (ran twice before)", f"{M} evaluate --tasks antonyms,antonyms",
         f"{EV} task 'antonyms' is listed twice; list each task once"),
    Case("a task file named like a built-in task (two indistinguishable rows before)",
         f"{M} evaluate --tasks antonyms,antonyms.json",
         f"{EV} antonyms and antonyms.json are both named 'antonyms', so their results could not be told apart"),
    Case("an unknown task name", f"{M} evaluate --tasks nope", f"{EV} unknown task 'nope': not a built-in task (animal_class, antonyms,"),
    Case("a missing task file (reported as an unknown name before)", f"{M} evaluate --tasks missing.json",
         f"{EV} task file missing.json does not exist"),
    Case("a task file with a number as an output", f"{M} evaluate --tasks bad.json",
         f"{EV} bad.json: pairs[1] output must be a string, got int 3"),
    Case("--n-random without --prune", f"{M} evaluate --tasks t.json --n-random 2",
         f"{EV} --n-random needs --prune NEURONS.json"),
    Case("--random-match without --prune", f"{M} evaluate --tasks t.json --random-match size",
         f"{EV} --random-match needs --prune NEURONS.json"),
    Case("calibration of generated answers", f"{M} evaluate --tasks t.json --calibrate contextual",
         f"{EV} --calibrate re-weights label probabilities: add --scoring labels"),
    Case("an unknown calibration", f"{M} evaluate --tasks t.json --scoring labels --calibrate platt",
         f"{EV} argument --calibrate: expected comma-separated calibrations from contextual, batch, domain, got 'platt'"),
    Case("label scoring of an open task", f"{M} evaluate --tasks open.json --scoring labels",
         f"{EV} task 'open' is open, so it cannot be scored as a label set: its file says \"closed\": false"),
    Case("the copy-control construction of an open task", f"{M} evaluate --tasks open.json --copy-control",
         f"{EV} task 'open' is open, so it cannot be scored as a label set"),
    # ---- models
    Case("a missing model folder (reported as an unknown name before)", f"{M} evaluate --tasks t.json --model ./nowhere",
         f"{EV} model folder ./nowhere does not exist"),
    Case("an empty model name (`load_model('')` loaded the current folder before)", f"{M} evaluate --tasks t.json --model ''",
         f"{EV} empty model name; known zoo models: smollm2-135m, gemma-3-270m"),
    Case("an unknown model name", f"{M} evaluate --tasks t.json --model gpt-5",
         f"{EV} unknown model 'gpt-5': not a zoo model (smollm2-135m, gemma-3-270m; default smollm2-135m)"),
    Case("a folder that is not a model", f"{M} evaluate --tasks t.json --model empty_dir",
         f"{EV} empty_dir is a folder but has no config.json"),
    Case("`load_model(123)`", **_call("load_model(123)", lambda d: __import__("mechcopy").load_model(123)),
         message="TypeError: load_model expects a model name or folder (str or Path), got int 123"),
    Case("`load_model(None)`", **_call("load_model(None)", lambda d: __import__("mechcopy").load_model(None)),
         message="TypeError: load_model expects a model name or folder (str or Path), got NoneType None"),
    Case("a model folder that asks to run its own code, and a user who answers y",
         **_call("load_model('hostile')", _load_hostile),
         message="ValueError: The repository", disk=only("hostile/config.json", "hostile/configuration_evil.py",
                                                         "hostile/modeling_evil.py",
                                                         words="the folder's code never ran (no marker file)")),
    # ---- --out: checked before the model loads
    Case("--out is the task file (replaced with results, exit 0, before)", f"{M} evaluate --model tiny --tasks t.json --out t.json",
         f"{EV} --out t.json would overwrite the input --tasks t.json; write the results elsewhere"),
    Case("--out is the neuron file", f"{M} patch --model tiny --task t.json --neurons n.json --out n.json",
         f"{M} patch: error: --out n.json would overwrite the input --neurons n.json; write the results elsewhere"),
    Case("--out is find's held-out text", f"{M} find --model tiny --text text.txt --out text.txt",
         f"{M} find: error: --out text.txt would overwrite the input --text text.txt; write the results elsewhere"),
    Case("--out inside the model folder", f"{M} evaluate --model mymodel --tasks t.json --out mymodel/config.json",
         f"{EV} --out mymodel/config.json would overwrite the input --model mymodel; write the results elsewhere"),
    Case("an existing result (replaced without notice before)", f"{M} evaluate --model tiny --tasks t.json --out r.json",
         f"{EV} --out r.json exists; pass --force to replace it, or choose another file"),
    Case("--out is a folder (a traceback after the work before)", f"{M} evaluate --model tiny --tasks t.json --out folder",
         f"{EV} --out folder is a folder; name a file, such as folder/results.json"),
    Case("--out under a file (a traceback after the work before)", f"{M} evaluate --model tiny --tasks t.json --out t.json/r.json",
         f"{EV} --out t.json/r.json: t.json is a file, not a folder"),
    Case("--out in a folder nobody may write (a traceback after the work before)",
         f"{M} evaluate --model tiny --tasks t.json --out /sys/r.json",
         f"{EV} --out /sys/r.json: cannot write in /sys (Permission denied)"),
    Case("reproduce --out is a file", f"{M} reproduce --model tiny --out t.json", f"{M} reproduce: error: --out t.json is a file; name a folder"),
    Case("reproduce --out holds other files", f"{M} reproduce --model tiny --out full",
         f"{M} reproduce: error: --out full is a folder that is not empty; pass --force to write into it anyway"),
    Case("find --out in a missing folder (crashed at the first checkpoint before)", f"{FIND} --out new/sub/n.json",
         "wrote new/sub/n.json", code=0, disk=only("new/sub/n.json", "new/sub/n.scores.safetensors", "new/sub/n.scores.json",
                                                   "new/sub/n.attributions.safetensors",
                                                   words="the folders are created; the neuron file and its side files")),
    # ---- neuron files: refused on loading, or right after the model loads, before any work
    Case("fractions as indices", f"{M} evaluate --model tiny --tasks t.json --prune floats.json",
         f"{EV} floats.json: not a neuron file: neuron 0's layer must be an integer, got float 1.9"),
    Case("a string as an index", f"{M} evaluate --model tiny --tasks t.json --prune strs.json",
         f"{EV} strs.json: not a neuron file: neuron 0's layer must be an integer, got str '10'"),
    Case("`true` as an index", f"{M} evaluate --model tiny --tasks t.json --prune bools.json",
         f"{EV} bools.json: not a neuron file: neuron 0's layer must be an integer, got bool True"),
    Case("`\"model\": {}` (passed for any model before)", f"{M} evaluate --model tiny --tasks t.json --prune nomodel.json",
         f"{EV} nomodel.json: not a neuron file: field 'model' lacks name, architecture, n_layers, d_model"),
    Case("`\"neurons\": null` (a traceback before)", f"{M} evaluate --model tiny --tasks t.json --prune null.json",
         f"{EV} null.json: not a neuron file: field 'neurons' must be a list of [layer, index] pairs, got None"),
    Case("no neurons, and no word why", f"{M} evaluate --model tiny --tasks t.json --prune empty.json",
         f"{EV} empty.json: not a neuron file: it holds no neurons and does not say why"),
    Case("a neuron file of another model", f"{M} evaluate --model tiny --tasks t.json --prune other.json",
         f"{EV} the neuron set (other.json) was found on another model (name: file has 'smollm2-135m'"),
    Case("the same model with other weights (weight hash never compared before)",
         f"{M} evaluate --model tiny --tasks t.json --prune hash.json",
         f"{EV} the neuron set (hash.json) was found on another model (weight_hash: file has '0000000000000000'"),
    Case("an index out of range", f"{M} evaluate --model tiny --tasks t.json --prune oor.json",
         f"{EV} oor.json: neuron (0, 64) is out of range: the model the set names has 2 layers of 64 neurons"),
    Case("task-vectors with another model's neurons (exit 0, `\"results\": []` before)", f"{TV} --tasks small.json --prune other.json",
         f"{M} task-vectors: error: the neuron set (other.json) was found on another model"),
    Case("patch with another model's neurons (checked after a 720-run sweep before)",
         f"{M} patch --model tiny --task t.json --shots 2 --neurons other.json --out p.json",
         f"{M} patch: error: the neuron set (other.json) was found on another model", patch=_sweep_must_not_run),
    Case("the copy scores moved away (the bottom baseline dropped silently before)",
         f"{M} evaluate --model tiny --tasks t.json --prune moved.json",
         f"{EV} the bottom-score baseline needs the copy scores of moved.json, which are neither at /gone/moved.scores.safetensors"),
    Case("damaged copy scores (a SafetensorError traceback before)", f"{M} evaluate --model tiny --tasks t.json --prune junk.json",
         f"{EV} junk.scores.safetensors is damaged or not a copy-score file ("),
    Case("find chose k = 0: nothing to prune", f"{M} evaluate --model tiny --tasks t.json --shots 2 --n 4 --prune k0.json --out r2.json",
         "k0.json holds no neurons (no k improves dev accuracy over the unpruned model): nothing to prune", code=0,
         disk=json_at("r2.json", lambda r: [x["condition"] for x in r["results"]] == ["unpruned"],
                      "`r2.json` with the unpruned rows only")),
    Case("task vectors with find's k = 0", f"{TV} --tasks small.json --prune k0.json",
         "k0.json holds no neurons (no k improves dev accuracy over the unpruned model): nothing to prune, unpruned "
         "results only", code=0),
    Case("patching with find's k = 0", f"{M} patch --model tiny --task t.json --shots 2 --n 2 --neurons k0.json --out p.json",
         "k0.json holds no neurons (no k improves dev accuracy over the unpruned model): no neuron patching", code=0,
         disk=json_at("p.json", lambda r: r["neurons"] == 0 and r["neuron_all_positions"] is None,
                      "`p.json` without a neuron patch")),
    # ---- context
    Case("prompts longer than the context (cut silently before)", f"{M} evaluate --model tiny --tasks long.json --n 2",
         f"{EV} prompt 0 of task 'long' has 77"),
    Case("prompts longer than the context, task vectors", f"{TV} --tasks long.json --shots 4",
         f"{M} task-vectors: error: prompt 0 of task 'long' has 7"),
    Case("prompts longer than the context, patching", f"{M} patch --model tiny --task long.json --out p.json",
         f"{M} patch: error: prompt of task 'long' has 7"),
    Case("a prompt longer than the context, IG", **_call("integrated_gradients(tiny, [long_prompt])", _long_prompt),
         message="ValueError: prompt of task 'long' has 7"),
    # ---- task data
    Case("repeated pairs (removed without a word before)", f"{M} evaluate --model tiny --tasks dup.json --shots 2 --n 4 --out r2.json",
         "dup: 2 pairs not used, e.g. ['ab', 'AB']: repeats an earlier pair; all listed under \"dropped\" in the results",
         code=0, disk=json_at("r2.json", lambda r: len(r["dropped"]["dup"]) == 2, "`r2.json`, the 2 pairs under \"dropped\"")),
    Case("an input with two outputs (used as two queries before)", f"{M} evaluate --model tiny --tasks amb.json --shots 2 --n 4",
         "amb: 2 pairs not used, e.g. ['ab', 'AB']: input 'ab' has 2 different outputs", code=0),
    Case("a task too small for the sizes asked (said nothing; interval [0, 0] before)",
         f"{M} task-vectors --model tiny --tasks small.json --out tv.json",
         "small: only 1 dev and 2 test prompts (asked 20 and 50): the task has too few usable pairs", code=0,
         disk=json_at("tv.json", lambda r: all(x["test_accuracy_ci"][1] > x["test_accuracy"] or x["test_accuracy"] == 1
                                               for x in r["results"]),
                      "`tv.json`; every interval wider than the point (exact binomial)")),
    Case("predictions that do not pair with the prompts", **_call("summarize(prompts[:2], 3 predictions)", _summarize_wrong_length),
         message="ValueError: 3 predictions for 2 prompts; they must pair up one to one"),
    # ---- hooks
    Case("a negative neuron index (pruned the last neuron before)",
         **_call("zero_neurons([-1])", lambda d: __import__("mechcopy.hooks").hooks.zero_neurons([-1])),
         message="IndexError: neuron indices must be >= 0, got -1"),
    Case("a fractional neuron index (truncated before)",
         **_call("zero_neurons([1.7])", lambda d: __import__("mechcopy.hooks").hooks.zero_neurons([1.7])),
         message="TypeError: neuron indices must be integers, got [1.7]"),
    Case("a fractional layer", **_call("neuron_site(tiny, 1.5)", lambda d: __import__("mechcopy.sites").sites.neuron_site(
        __import__("mechcopy.models.tiny").models.tiny.tiny_transformer(), 1.5)),
         message="TypeError: layer must be an integer, got float 1.5"),
    # ---- interruptions and damage
    Case("Ctrl-C during evaluate (5 finished tasks lost before)",
         f"{M} evaluate --model tiny --tasks t.json,dup.json,small.json --shots 2 --n 4 --out r2.json",
         f"{M} evaluate: interrupted; the finished (task, condition) rows are in r2.partial.jsonl: run the same command "
         "to resume", code=130, patch=_interrupt_after("mechcopy.suite.evaluate_task", 3), disk=partial_rows("r2.partial.jsonl", 2)),
    Case("Ctrl-C during evaluate without --out", f"{M} evaluate --model tiny --tasks t.json,dup.json --shots 2 --n 4",
         f"{M} evaluate: interrupted; nothing was saved; run the command again", code=130,
         patch=_interrupt_after("mechcopy.suite.evaluate_task", 2)),
    Case("Ctrl-C during find", f"{FIND} --checkpoint-every 1 --out n3.json",
         f"{M} find: interrupted; the attributions done so far are in n3.partial.safetensors: run the same command "
         "to resume", code=130, patch=_interrupt_after("mechcopy.method.integrated_gradients", 2),
         disk=only("n3.partial.safetensors", words="`n3.partial.safetensors` with the first prompt")),
    Case("Ctrl-C during reproduce", f"{M} reproduce --model tiny --out run",
         f"{M} reproduce: interrupted; the finished stages and the checkpoints of find and evaluate are in run: run the "
         "same command to resume", code=130, patch=_interrupt_after("mechcopy.method.integrated_gradients", 1),
         disk=only("run/settings.json", words="`run/settings.json` (the run resumes from it)")),
    Case("a damaged find checkpoint (blocked find until deleted before)", f"{FIND} --out n.json --force",
         "mechcopy: checkpoint n.partial.safetensors is damaged", code=0,
         disk=only("n.json", "n.scores.safetensors", "n.scores.json", "n.attributions.safetensors",
                   gone=("n.partial.safetensors",),
                   words="a new checkpoint replaces the damaged one; the neuron file is written, the checkpoint removed")),
    Case("a zoo manifest without its file list (not rebuilt before)",
         **_call("zoo.cache_problem('smollm2-135m')", _zoo_manifest_without_files),
         message="ValueError: " + "{cache}/models/smollm2-135m/mechcopy-manifest.json is unreadable or lacks its file list",
         disk=only("cache/models/smollm2-135m/mechcopy-manifest.json", words="nothing but the test's fake cache")),
    Case("a truncated zoo cache (listed as cached before)", f"{M} models",
         "smollm2-135m: the cached copy is unusable ({cache}/models/smollm2-135m/model.safetensors is truncated "
         "(10 of 1000 bytes)); it is fetched again on first use", code=0, patch=_truncated_cache),
]


# ------------------------------------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def tiny_model():
    from mechcopy.models.tiny import tiny_transformer

    return tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0)


@pytest.mark.parametrize("case", CASES, ids=[f"{i + 1:02d}" for i in range(len(CASES))])
def test_case(case: Case, tiny_model, tmp_path, monkeypatch, capsys, one_thread):
    import mechcopy.models
    from mechcopy.commands import main
    from mechcopy.models.zoo import ZOO

    if case.skip and case.skip():
        pytest.skip(case.skip())
    real = mechcopy.models.load_model

    def load(name, **kw):
        assert name not in ZOO, "a row must not load a real model"
        return tiny_model if name == "tiny" else real(name, **kw)

    monkeypatch.setattr(mechcopy.models, "load_model", load)
    make_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    if case.patch:
        case.patch(monkeypatch, tmp_path)
    before = snapshot(tmp_path)
    message = case.message.replace("{cache}", str(tmp_path / "cache"))
    if case.is_command:
        code = main(shlex.split(case.run)[1:])
        out, err = capsys.readouterr()
        lines = [line.strip() for line in re.split(r"[\r\n]", out + err)]
        assert code == case.code, f"exit {code}:\n{out}\n{err}"
        assert any(line.startswith(message) for line in lines), f"no line starts with {message!r}:\n{out}\n{err}"
        if code == 2:
            assert len(err.splitlines()) == 1, err   # one line, no traceback
    else:
        with pytest.raises(Exception) as info:
            case.call(tmp_path)
        got = f"{type(info.value).__name__}: {info.value}"
        # a call of the wrong type may be refused by its annotation first (the tests check annotations at
        # run time); without those checks the call's own message is the table's
        if not (isinstance(info.value, TypeCheckError) and message.startswith("TypeError:")):
            assert got.startswith(message), got
    assert case.disk.check(tmp_path, before), case.disk.words
    assert not (tmp_path / "RAN").exists(), "a model folder's code ran"


# ------------------------------------------------------------------------------------------- the doc


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render_table() -> str:
    rows = ["| # | bad input | command or call | message (stable start) | on disk after |", "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        exit_note = "" if not c.is_command or c.code == 2 else f" (exit {c.code})"
        rows.append(f"| {i} | {c.what} | {_code(c.run)} | {_code(c.message)}{exit_note} | {c.disk.words} |")
    return "\n".join(rows)


def test_doc_table_is_current():
    text = DOC.read_text()
    table = text[text.index(START) + len(START):text.index(END)].strip()
    assert table == render_table(), "docs/reliability.md is stale: run `python tests/test_reliability.py`"
    assert len(CASES) >= 40


def test_every_numeric_option_has_a_checked_type():
    """No option is a bare int or float: each has bounds (so a bad value is refused, by name, before loading)."""
    from mechcopy.commands import build_parser

    bare = [f"{name} {action.option_strings[0]}"
            for name, sub in build_parser()._subparsers._group_actions[0].choices.items()
            for action in sub._actions if action.option_strings and action.type in (int, float)]
    assert not bare, bare


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/x/r.json"),
     "Permission denied: /x/r.json; check the path and its permissions"),
    (IsADirectoryError(21, "Is a directory", "out"), "Is a directory: out; check the path and its permissions"),
    (KeyError("files"), "internal error: missing key 'files'; run again with --debug and report the traceback"),
    (ValueError("two\n   lines"), "two lines"),
    (AssertionError("x"), "AssertionError: x (unexpected; run again with --debug for the traceback)"),
])
def test_errors_become_one_line(error, line, monkeypatch, capsys):
    """Whatever a command raises, `main` prints one line (the traceback only with --debug)."""
    import mechcopy.commands.models as models
    from mechcopy.commands import main

    def fail(args):
        raise error

    monkeypatch.setattr(models, "run", fail)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == f"mechcopy models: error: {line}\n"
    with pytest.raises(type(error)):
        main(["models", "--debug"])


def test_a_damaged_safetensors_file_is_one_line(tmp_path, capsys):
    from safetensors import SafetensorError

    from mechcopy.commands import describe

    (tmp_path / "x.safetensors").write_bytes(b"junk")
    from safetensors import safe_open

    with pytest.raises(SafetensorError) as info:
        safe_open(str(tmp_path / "x.safetensors"), "pt")
    assert describe(info.value).startswith("a .safetensors file is damaged or is not one (")


def test_bottom_baseline_follows_a_moved_folder(tiny, tmp_path):
    """A neuron file moved together with its scores still gets its bottom-score baseline."""
    import shutil

    import torch

    from mechcopy.attribution import CopyScores
    from mechcopy.neurons import NeuronSet, model_fingerprint
    from mechcopy.conditions import standard_conditions

    fp = model_fingerprint(tiny)
    old = tmp_path / "old"
    old.mkdir()
    scores = CopyScores(torch.rand(2, 64), {"model": fp}).save(old / "n.scores.safetensors")
    NeuronSet(((0, 1),), fp, {"scores_path": str(scores)}).save(old / "n.json")
    shutil.move(old, tmp_path / "new")
    moved = NeuronSet.load(tmp_path / "new" / "n.json")
    assert [c.label for c in standard_conditions(tiny, moved, n_random=1)] == ["pruned", "random-0", "bottom"]


if __name__ == "__main__":
    text = DOC.read_text()
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    DOC.write_text(f"{head}\n{render_table()}\n{tail}")
    print(f"wrote {len(CASES)} rows to {DOC}")
