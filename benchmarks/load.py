"""Loading a zoo model: TransformerLens' plain path against the processed cache, cold and warm.

    flock /tmp/mechcopy-cpu.lock python benchmarks/load.py [--models smollm2-135m,gemma-3-270m]
        [--warm 3] [--out docs/data/load.json]

Every measurement runs in a fresh Python process, so its peak resident memory (ru_maxrss, which
counts the memory-mapped weights it touches) belongs to it alone. One thread (torch and OpenMP). Per model:

- import: importing torch, TransformerLens, transformers and mechcopy's loader, nothing loaded (the floor);
- plain: `models.loading.tl_reference_load`, the load of 81a615e (HF model, converter, random
  HookedTransformer, processing, layout), after `zoo.fetch` verified the dequantised cache;
- cold: `load_model` with the model's processed-cache entry removed first (it processes and writes it);
- warm: `load_model` again, `--warm` times (a fresh process each).

Each row gives the import time, the load time (the call alone), the first forward pass of a short
prompt (which pages in the memory-mapped weights), and the process's peak RSS, beside the float32
size of the model's parameters (TransformerLens keeps the embedding and the unembedding apart,
so this exceeds the HF checkpoint for tied models) and whether its logits equal the plain load's
bit for bit. The zoo's one-time download and dequantisation are not part of any row; the model must
be in the cache (`mechcopy models fetch NAME`). Only the model's processed entry is removed, in
whatever cache $MECHCOPY_CACHE names. Run alone: timings beside other jobs mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "hot -> cold\nbig -> small\nup -> down\nfast ->"
MODES = ("import", "plain", "cold", "warm")


def child(mode: str, name: str) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    t0 = time.perf_counter()
    import torch
    import transformer_lens  # noqa: F401
    import transformers  # noqa: F401

    from mechcopy.models import loading, zoo

    torch.set_num_threads(1)
    out = {"mode": mode, "model": name, "import_s": time.perf_counter() - t0}
    if mode != "import":
        t1 = time.perf_counter()
        if mode == "plain":
            model = loading.tl_reference_load(zoo.fetch(name), name, tl_name=zoo.ZOO[name].tl_name)
        else:
            model = loading.load_model(name, device="cpu")
        out["load_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        with torch.no_grad():
            logits = model(model.to_tokens(PROMPT))[0, -1]
        out["first_forward_s"] = time.perf_counter() - t2
        out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["logits_sha256"] = __import__("hashlib").sha256(logits.numpy().tobytes()).hexdigest()
        out["next_token"] = model.to_string(logits.argmax())
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_child(mode: str, name: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, name], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {name} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def measure(name: str, warm: int) -> dict:
    from mechcopy.models import processed, zoo

    if not zoo.is_cached(name):
        raise SystemExit(f"{name} is not in the cache ({zoo.cache_root()}); run `mechcopy models fetch {name}` first")
    rows = [run_child("import", name), run_child("plain", name)]
    shutil.rmtree(processed.entry_dir(zoo.model_dir(name)), ignore_errors=True)
    rows.append(run_child("cold", name))
    rows += [run_child("warm", name) for _ in range(warm)]
    for row in rows:
        print(_line(row), flush=True)
    plain = rows[1]
    weights_file = zoo.model_dir(name) / zoo.WEIGHTS
    summary = {"model": name, "param_bytes_float32": plain["param_bytes"],
               "hf_weights_file_bytes": weights_file.stat().st_size,
               "import_peak_rss_bytes": rows[0]["peak_rss_bytes"], "import_s": rows[0]["import_s"]}
    for mode in ("plain", "cold", "warm"):
        these = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "load_s": statistics.median(r["load_s"] for r in these),
            "first_forward_s": statistics.median(r["first_forward_s"] for r in these),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in these),
            "peak_over_import_in_weights": (max(r["peak_rss_bytes"] for r in these) - rows[0]["peak_rss_bytes"])
            / plain["param_bytes"],
            "logits_equal_plain": all(r["logits_sha256"] == plain["logits_sha256"] for r in these),
            "runs": len(these),
        }
    return {"summary": summary, "rows": rows}


def _line(row: dict) -> str:
    gb = row["peak_rss_bytes"] / 1e9
    if row["mode"] == "import":
        return f"{row['model']:14s} import  {row['import_s']:6.2f} s              peak {gb:5.2f} GB"
    return (f"{row['model']:14s} {row['mode']:6s}  load {row['load_s']:6.2f} s  first forward {row['first_forward_s']:5.2f} s"
            f"  peak {gb:5.2f} GB  (import {row['import_s']:.2f} s; {row['next_token']!r})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    parser.add_argument("--warm", type=int, default=3, help="warm loads per model (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the summary as JSON")
    args = parser.parse_args()
    from mechcopy.io import write_json_atomic
    from mechcopy.models import zoo
    from mechcopy.provenance import git_revision

    started = os.getloadavg()
    results = [measure(name.strip(), args.warm) for name in args.models.split(",") if name.strip()]
    print()
    for r in results:
        s = r["summary"]
        w = s["param_bytes_float32"] / 1e9
        print(f"{s['model']}: float32 parameters {w:.2f} GB, import alone {s['import_peak_rss_bytes'] / 1e9:.2f} GB "
              f"({s['import_s']:.1f} s)")
        for mode in ("plain", "cold", "warm"):
            m = s[mode]
            print(f"  {mode:6s} load {m['load_s']:6.2f} s, peak {m['peak_rss_bytes'] / 1e9:5.2f} GB = import + "
                  f"{m['peak_over_import_in_weights']:.2f} x weights; logits equal to plain: {m['logits_equal_plain']}")
    if args.out:
        write_json_atomic(args.out, {
            "command": "flock /tmp/mechcopy-cpu.lock python benchmarks/load.py " + " ".join(sys.argv[1:]),
            "git_revision": git_revision(), "cache": str(zoo.cache_root()), "threads": 1,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_at_start": started,
            "load_average_at_end": os.getloadavg(), "models": [r["summary"] for r in results],
            "rows": [row for r in results for row in r["rows"]]})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
