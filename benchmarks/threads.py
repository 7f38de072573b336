"""1 vs 2 torch threads, alone and beside a busy process: how `--threads`' default was chosen.

    flock /work/runs/model.lock python benchmarks/threads.py [--model smollm2-135m]

Times one evaluation of 20 antonyms prompts (4 shots) and IG of 2 probe prompts (m = 10) with 1 and
2 threads, first alone, then beside one `python -c "while True: pass"`, then alone again, and prints
one line per run with the 1-minute load average (docs/reliability.md has the table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def timed(threads: int, fn) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from mechcopy import load_model
    from mechcopy.attribution import integrated_gradients
    from mechcopy.evaluation import evaluate
    from mechcopy.tasks import load_task
    from mechcopy.tasks.probe import probe_splits
    from mechcopy.tasks.prompts import build_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    prompts = build_prompts(load_task("antonyms"), model.tokenizer, shots=4, n=20, seed=0).prompts
    probe, _ = probe_splits(model.tokenizer, n_attr=2, n_dev=1)
    evaluate(model, prompts[:4])                               # warm up
    workloads = {"evaluate-20": lambda: evaluate(model, prompts),
                 "ig-2x10": lambda: integrated_gradients(model, probe, steps=10)}
    for label in ("alone", "beside busy", "alone"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if label != "alone" else None
        time.sleep(1)
        for name, fn in workloads.items():
            for threads in ((1, 2, 1, 2) if name == "evaluate-20" else (1, 2)):
                seconds = timed(threads, fn)
                print(f"{label:12s} {name:12s} threads={threads} {seconds:6.2f} s  "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
        if busy:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
