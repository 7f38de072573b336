"""`mechcopy reproduce`: the main job, model to report.

Stages run in order and each writes its result to OUT/<stage>.json; a stage whose result
exists is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mechcopy.sites import model_fingerprint, write_json_atomic

DEMO_PROMPT = "hot -> cold\nbig -> small\nup -> down\nfast ->"


def stage_demo(model, out: Path) -> dict:
    """A one-prompt ICL demo: the model's next token after an antonym prompt."""
    logits = model(DEMO_PROMPT)[0, -1]
    top = logits.topk(5)
    return {
        "prompt": DEMO_PROMPT,
        "top5": [(model.to_string(int(i)), round(float(v), 3)) for v, i in zip(top.values, top.indices)],
    }


STAGES = [("demo", stage_demo)]


def reproduce(model_name: str, out: str | Path) -> Path:
    from mechcopy.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name)
    summary = {"model": model_fingerprint(model), "stages": {}}
    for name, stage in STAGES:
        path = out / f"{name}.json"
        if path.exists():
            print(f"[{name}] done already ({path})")
            result = json.loads(path.read_text())
        else:
            t0 = time.time()
            result = {"stage": name, "result": stage(model, out), "seconds": round(time.time() - t0, 2)}
            write_json_atomic(path, result)
            print(f"[{name}] {result['seconds']} s -> {path}")
        summary["stages"][name] = result
    write_json_atomic(out / "summary.json", summary)
    demo = summary["stages"]["demo"]["result"]
    print(f"\n{demo['prompt']!r} -> top-5 next tokens: {demo['top5']}")
    return out


def _run(args) -> int:
    reproduce(args.model, args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the main job: copy neurons -> pruning -> evaluation -> report")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="results/smollm2-135m")
    p.set_defaults(func=_run)
