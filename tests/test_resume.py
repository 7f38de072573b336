"""Nothing is lost: an evaluation killed with SIGKILL resumes without redoing a finished (task,
condition) and ends with the JSON of an uninterrupted run; checkpoints survive torn lines and other
settings; find's k = 0 is said plainly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechcopy.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _task_files(folder: Path, n_tasks: int = 6, n_pairs: int = 30) -> str:
    """`n_tasks` small user tasks (distinct names), comma-joined for --tasks."""
    names = []
    for t in range(n_tasks):
        words = [LETTERS[(i + t) % 26] + LETTERS[(3 * i + t) % 26] + LETTERS[(7 * i + 2 * t) % 26] for i in range(n_pairs)]
        words = list(dict.fromkeys(words))
        pairs = [[w, w[::-1] if t % 2 else w.upper()] for w in words]
        path = folder / f"task{t}.json"
        path.write_text(json.dumps({"name": f"task{t}", "pairs": pairs}))
        names.append(path.name)
    return ",".join(names)


def _without_seconds(obj):
    """The result JSON less its timings (the only part that differs between two equal runs)."""
    if hasattr(obj, "to_json"):
        return _without_seconds(obj.to_json())
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _recording(monkeypatch) -> list[tuple[str, str]]:
    """Record every (task, condition) that `run_evaluation` evaluates."""
    import mechcopy.suite as suite

    done, real = [], suite.evaluate_task

    def record(model, task, prompts, conditions, seed=0, batch_size=128):
        done.extend((task.name, c.label) for c in conditions)
        return real(model, task, prompts, conditions, seed, batch_size)

    monkeypatch.setattr(suite, "evaluate_task", record)
    return done


def test_evaluate_killed_with_sigkill_resumes_without_redoing_anything(tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                                                       one_thread, tiny_cache):
    from mechcopy import load_model
    from mechcopy.commands import main
    from mechcopy.neurons import NeuronSet, model_fingerprint

    tasks = _task_files(tmp_path)
    NeuronSet(((0, 1), (1, 3), (1, 7)), model_fingerprint(load_model(tiny_llama_dir))).save(tmp_path / "n.json")
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--tasks", tasks, "--shots", "3", "--n", "24", "--prune",
            "n.json", "--n-random", "4", "--threads", "1", "--out", "r.json"]
    total = 6 * 6                                     # tasks x (unpruned, pruned, 4 random sets)
    partial = tmp_path / "r.partial.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MECHCOPY_CACHE": str(tiny_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "mechcopy", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(read_jsonl(partial))) < 4:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = [(e["task"], e["condition"]) for e in read_jsonl(partial)]
    assert 4 <= len(done) < total and not (tmp_path / "r.json").exists()

    monkeypatch.chdir(tmp_path)
    redone = _recording(monkeypatch)
    assert main(argv) == 0
    assert f"mechcopy: resuming from r.partial.jsonl: {len(done)} of {total} (task, condition) rows already done" \
        in capsys.readouterr().err
    assert not set(redone) & set(done), "a finished (task, condition) was evaluated again"
    assert len(redone) + len(done) == total and not partial.exists()

    assert main(argv[:-1] + ["r_once.json"]) == 0
    resumed, once = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "r_once.json"))
    assert _without_seconds(resumed) == _without_seconds(once)


def test_checkpoint_survives_a_torn_line_and_keeps_other_settings(tiny, tmp_path, monkeypatch, one_thread, capsys):
    from mechcopy.conditions import UNPRUNED, Condition
    from mechcopy.neurons import NeuronSet, model_fingerprint
    from mechcopy.suite import run_evaluation
    from mechcopy.tasks import load_tasks

    monkeypatch.chdir(tmp_path)
    tasks = load_tasks(_task_files(tmp_path, n_tasks=3, n_pairs=12))
    conditions = [UNPRUNED, Condition("pruned", components=NeuronSet(((0, 1), (0, 2)), model_fingerprint(tiny)))]
    journal = tmp_path / "j.jsonl"
    rows, dropped = run_evaluation(tiny, tasks, 2, 6, 0, conditions, progress=False, checkpoint=journal)
    lines = journal.read_text().splitlines()
    assert len(lines) == 6
    # a kill mid-append leaves half a line; a line of other settings is kept, and both are said
    other_run = json.loads(lines[0]) | {"key": "another-setting"}
    journal.write_text("\n".join(lines[:3] + [json.dumps(other_run), lines[3][:40]]))
    capsys.readouterr()
    redone = _recording(monkeypatch)
    again, _ = run_evaluation(tiny, tasks, 2, 6, 0, conditions, progress=False, checkpoint=journal)
    assert redone == [(t.name, c) for t in tasks[1:] for c in ("unpruned", "pruned")][1:]
    assert _without_seconds(again) == _without_seconds(rows)
    said = capsys.readouterr().err
    assert "1 line not reused (line 5: not JSON" in said and "also holds 1 row of other settings" in said, said
    assert [e["key"] for e in read_jsonl(journal)].count("another-setting") == 1
    assert len(journal.read_text().splitlines()) == 7
    # another neuron set is another setting: nothing is reused
    redone.clear()
    other = [UNPRUNED, Condition("pruned", components=NeuronSet(((0, 1), (0, 3)), model_fingerprint(tiny)))]
    run_evaluation(tiny, tasks, 2, 6, 0, other, progress=False, checkpoint=journal)
    assert redone == [(t.name, "pruned") for t in tasks]
    # so is another ablation of the same set
    redone.clear()
    mean = [UNPRUNED, Condition("pruned", components=conditions[1].components, positions="last")]
    run_evaluation(tiny, tasks, 2, 6, 0, mean, progress=False, checkpoint=journal)
    assert redone == [(t.name, "pruned") for t in tasks]


def test_reproduce_resumes_its_evaluation_stage(tiny, tmp_path, monkeypatch, one_thread, best_k_chosen):
    from mechcopy import reproduce as rp

    cfg = rp.ReproduceConfig(model="tiny", find=rp.FindConfig(n=2, n_dev=4, steps=2),
                             tasks="next_letter,to_upper,prev_letter", n_eval=4, n_random=1)
    out = tmp_path / "run"
    monkeypatch.setattr(rp, "STAGES", rp.STAGES[:2])
    import mechcopy.suite as ev

    real, calls = ev.evaluate_task, []

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_task", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce(tiny, cfg, out)
    done = {(e["task"], e["condition"]) for e in read_jsonl(out / "evaluate.partial.jsonl")}
    assert len(done) == 2 * 4                        # two tasks x (unpruned, pruned, random-0, bottom)
    redone = _recording(monkeypatch)
    rp.reproduce(tiny, cfg, out)
    assert {t for t, _ in redone} == {"prev_letter"} and not (out / "evaluate.partial.jsonl").exists()


def test_sweep_never_chooses_a_k_worse_than_no_pruning():
    """Issue 15's case: find --n 8 --steps 4 chose k = 5 while dev accuracy fell from 0.20 to 0.04."""
    from mechcopy.sweeps import _choose_k

    rows = [{"k": 5, "dev_accuracy": 0.04, "feasible": True}, {"k": 10, "dev_accuracy": 0.02, "feasible": True}]
    k, why = _choose_k(rows, {"dev_accuracy": 0.20})
    assert k == 0 and why.startswith("no k improves dev accuracy over the unpruned model (0.200; best pruned: k = 5")
    assert _choose_k(rows, {"dev_accuracy": 0.03}) == (5, "")
    assert _choose_k([{**r, "feasible": False} for r in rows], {"dev_accuracy": 0.0})[0] == 0


def test_find_that_chooses_k0_says_so(tiny, tmp_path, monkeypatch, capsys, one_thread):
    import mechcopy.models
    from mechcopy import sweeps
    from mechcopy.commands import main
    from mechcopy.neurons import NeuronSet

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    monkeypatch.setattr(sweeps, "_choose_k", lambda rows, baseline: (0, "no k improves dev accuracy (test)"))
    out = tmp_path / "n.json"
    assert main(["find", "--n", "2", "--n-dev", "2", "--shots", "2", "--steps", "2", "--ks", "2,4",
                 "--ppl-tokens", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "k = 0 chosen: no k improves dev accuracy (test). The neuron file holds no neurons" in printed
    assert "k=0: dev accuracy" in printed and printed.count("<- chosen") == 1
    ns = NeuronSet.load(out)
    assert len(ns) == 0 and ns.meta["k"] == 0 and ns.meta["sweep"]["chosen_k"] == 0 and ns.why_empty.startswith("no k")
