"""Where a result came from, and how a job of stages resumes: `git_revision`, `run_stages`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mechcopy.io import write_json_atomic


def git_revision() -> str:
    """The short git revision of this checkout of mechcopy ("unknown" outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_stages(stages: Sequence[tuple[str, Callable[[], Any]]], out: Path) -> None:
    """Run each (name, fn) of `stages` whose OUT/<name>.json does not exist yet, in order, and write its
    result there (atomically, with its time): an interrupted run resumes at the first missing stage.
    Each `fn()` returns what its stage's JSON holds: a result with `to_json()`, or plain JSON data."""
    for name, stage in stages:
        path = out / f"{name}.json"
        if path.exists():
            print(f"[{name}] done already ({path.name}); skipping")
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.time()
        result = stage()
        result = result.to_json() if hasattr(result, "to_json") else result
        seconds = round(time.time() - t0, 1)
        write_json_atomic(path, {"stage": name, "seconds": seconds, "result": result})
        path.with_suffix(".partial.jsonl").unlink(missing_ok=True)  # the stage's checkpoint, if it keeps one
        print(f"[{name}] {seconds} s -> {path.name}", flush=True)


def read_stage(out: Path, name: str) -> Any:
    """The result `run_stages` wrote to OUT/<name>.json (a clear error when the stage has not run)."""
    path = Path(out) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the stage {name!r} has not run in {out}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))["result"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged or not a stage's result ({type(e).__name__}: {e}); "
                         "delete it and run the stage again") from e
