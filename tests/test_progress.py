"""Progress bars only where someone watches: a log file gets one line per stage, not bar updates."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mechcopy import progress

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def default_choice():
    progress.set_bars(None)
    yield
    progress.set_bars(None)


def test_redirected_stderr_gets_one_summary_line(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not progress.bars_shown()
    for _ in progress.tqdm(range(1000), desc="stage", mininterval=0):
        pass
    with progress.tqdm(total=7, desc="counted") as bar:
        bar.update(3)
        bar.update(4)
    for _ in progress.tqdm(range(50), desc="inner", leave=False, mininterval=0):   # transient: no line
        pass
    for _ in progress.tqdm(range(50), desc="off", disable=True):                     # its caller said no
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2, lines
    assert lines[0].startswith("mechcopy: stage: 1000/1000 in 00:0")
    assert lines[1].startswith("mechcopy: counted: 7/7 in ")


def test_terminal_or_forced_gets_the_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress.bars_shown()
    for _ in progress.tqdm(range(20), desc="stage", mininterval=0):
        pass
    assert "\r" in term.getvalue() and "20/20" in term.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    progress.set_bars(True)
    for _ in progress.tqdm(range(20), desc="stage", mininterval=0):
        pass
    assert "\r" in log.getvalue() and "mechcopy:" not in log.getvalue()
    progress.set_bars(False)
    monkeypatch.setattr(sys, "stderr", term)
    assert not progress.bars_shown()


def _evaluate_args(tmp_path, folder, *flags):
    task = tmp_path / "pairs.json"
    task.write_text(json.dumps({"name": "pairs", "pairs": [[a, a.upper()] for a in "abcdefghij"]}))
    return ["evaluate", "--model", str(folder), "--tasks", str(task), "--shots", "2", "--n", "6",
            "--out", str(tmp_path / f"r{len(flags)}.json"), *flags]


def test_cli_log_file_gets_no_bar_updates(tmp_path, tiny_llama_dir, tiny_cache, capsys):
    """`mechcopy evaluate 2> log`: one line per stage; with --progress the bar's updates come back."""
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MECHCOPY_CACHE": str(tiny_cache)}
    with open(err, "wb") as stderr:
        proc = subprocess.run([sys.executable, "-m", "mechcopy", *_evaluate_args(tmp_path, tiny_llama_dir)],
                              env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
    quiet = err.read_bytes().decode()
    assert proc.returncode == 0, quiet
    assert "\r" not in quiet and "it/s" not in quiet, quiet
    assert any(line.startswith("mechcopy: evaluate: 1/1 in ") for line in quiet.splitlines()), quiet
    from mechcopy.models import processed, zoo

    entry = processed.entry_dir(tiny_llama_dir).name      # in the tests' own cache, not the user's
    assert (tiny_cache / "processed" / entry).is_dir() and not (zoo.cache_root() / "processed" / entry).exists()
    from mechcopy.commands import main

    assert main(_evaluate_args(tmp_path, tiny_llama_dir, "--progress")) == 0   # stderr: pytest's, not a terminal
    loud = capsys.readouterr().err
    assert "\r" in loud and "evaluate: 100%" in loud and "mechcopy: evaluate:" not in loud, loud
