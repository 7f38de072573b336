"""The processed-weights cache: a model's final weights, written once, memory-mapped at every later load.

Building a hooked model from a Hugging Face folder means loading the HF model, converting its state
dict, folding norms and laying the weights out as TransformerLens reads them: seconds, and several
times the weights' size in memory. The first load of a folder stores the result (the model's config
and its final tensors, float32 safetensors) in `<cache>/processed/<folder name>-<path digest>/`;
every later load reads the tensors straight from that file (memory-mapped, no copy when the dtype
is float32) into a model built without random weights.

An entry is keyed by what its tensors depend on: the SHA-256 of the source folder's config and
weight files, the versions of TransformerLens, transformers and torch, the processing flags and this
file's format. Its manifest holds the key, the config and the size and SHA-256 of the weights file,
so a damaged entry (truncated, corrupted, half written) or a stale one (the folder's weights or a
library changed) is detected and rebuilt. Source files are hashed again only when their size or
modification time changed since the entry was written (as git's index does). An entry is written
in a temporary folder and renamed into place, under a lock, so a reader never sees half of one; a
cache that cannot be written (read-only, full) costs only the speed: the model is then built in
memory, with a note. A file is never changed in place once written: a model maps it, and a mapped
file truncated under it would kill that process (a rebuild writes a new file and renames it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

from mechcopy.errors import note
from mechcopy.io import apply_mode, write_json_atomic
from mechcopy.models.zoo import _lock, cache_root, sha256_file

#: bump when what an entry holds, or how it is laid out, changes (older entries are then stale)
FORMAT = 1
MANIFEST = "mechcopy-processed.json"
WEIGHTS = "weights.safetensors"
#: the files of a model folder a model is built from (tokenizer files are read from the folder itself)
SOURCE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                   "*.pt", "*.pth")


@dataclass(frozen=True)
class Processed:
    """A model's config (JSON) and final tensors (float32, contiguous, in the layout they are stored in).

    `folder` is the cache entry the tensors are memory-mapped from, or None where the cache could
    not be written (the tensors are then in memory).
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    folder: Path | None


def processed_root() -> Path:
    return cache_root() / "processed"


def entry_dir(source: Path) -> Path:
    """The cache entry of model folder `source` (one per folder; the key says whether it is current)."""
    source = Path(source).resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name)[:60] or "model"
    return processed_root() / f"{slug}-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"


def entry_size(source: Path) -> int:
    """Bytes on disk of model folder `source`'s entry (0 if it has none)."""
    folder = entry_dir(source)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def source_files(source: Path) -> list[Path]:
    """The config and weight files of model folder `source`, sorted by name."""
    found = {p for pattern in SOURCE_PATTERNS for p in Path(source).glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def source_record(source: Path, previous: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Size, modification time and SHA-256 of each source file; a file whose size and time match its
    entry in `previous` (an earlier record) keeps that digest instead of being read again."""
    previous = previous or {}
    record = {}
    for path in source_files(source):
        st = path.stat()
        old = previous.get(path.name)
        if isinstance(old, dict) and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = str(old.get("sha256"))
        else:
            digest = sha256_file(path)
        record[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return record


def versions() -> dict[str, str]:
    """The versions of the libraries whose code computes the processed tensors."""
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("transformer-lens", "transformers", "torch")}


def make_key(kind: str, record: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """An entry's key: the model class, the source files' digests, the library versions, the settings."""
    return {"format": FORMAT, "kind": kind, "source": {name: meta["sha256"] for name, meta in record.items()},
            "versions": versions(), "settings": settings}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def entry_problem(folder: Path, key: Mapping[str, Any], verify: bool = True) -> str | None:
    """Why the entry in `folder` cannot be used for `key`, or None when it is current and intact.

    `verify=False` skips the weights' SHA-256 (sizes are still checked)."""
    if not (folder / MANIFEST).exists():
        return "not cached"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder / MANIFEST} is unreadable"
    try:
        meta = manifest["files"][WEIGHTS]
        size, digest = int(meta["size"]), str(meta["sha256"])
        config = manifest["config"]
    except (KeyError, TypeError, ValueError):
        return f"{folder / MANIFEST} lacks its file list or config"
    if manifest.get("key") != json.loads(json.dumps(key)):
        return "stale: the source files, a library version or the settings changed since it was written"
    if not isinstance(config, dict):
        return f"{folder / MANIFEST} lacks its file list or config"
    path = folder / WEIGHTS
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != size:
        return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
    if verify and sha256_file(path) != digest:
        return f"{path} fails its SHA-256 check"
    return None


def read_entry(folder: Path) -> Processed:
    """An intact entry's config and its tensors, memory-mapped from the file."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    assert manifest is not None, folder
    return Processed(manifest["config"], load_file(str(folder / WEIGHTS)), folder)


def write_entry(folder: Path, key: Mapping[str, Any], processed: Processed, record: Mapping[str, Any],
                source: Path) -> Path:
    """Write an entry in a temporary folder beside `folder`, then rename it into place."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        work = Path(tmp) / "entry"
        work.mkdir()
        weights = work / WEIGHTS
        save_file({k: processed.tensors[k].contiguous() for k in sorted(processed.tensors)}, str(weights),
                  metadata={"format": "pt"})
        apply_mode(weights)
        write_json_atomic(work / MANIFEST, {
            "key": key, "source_path": str(Path(source).resolve()), "source_files": dict(record),
            "config": processed.config,
            "files": {WEIGHTS: {"size": weights.stat().st_size, "sha256": sha256_file(weights)}},
        })
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work, folder)  # atomic: a half-written entry never carries a manifest
    return folder


def _remember_source(folder: Path, manifest: dict[str, Any], record: Mapping[str, Any]) -> None:
    """Record the source files' new sizes and times (same digests) in the manifest, if it can be written."""
    try:
        write_json_atomic(folder / MANIFEST, {**manifest, "source_files": dict(record)})
    except OSError:
        pass


def remove_orphans() -> list[Path]:
    """Remove entries whose source folder no longer exists (a temporary folder, a deleted model)."""
    gone = []
    for folder in processed_root().glob("*"):
        manifest = read_manifest(folder) if folder.is_dir() else None
        path = (manifest or {}).get("source_path")
        if isinstance(path, str) and not Path(path).is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            (folder.parent / f".{folder.name}.lock").unlink(missing_ok=True)
            gone.append(folder)
    return gone


def load_processed(source: Path, kind: str, build: Callable[[], tuple[dict[str, Any], dict[str, Tensor]]],
                   **settings: Any) -> Processed:
    """The processed tensors of model folder `source`: from the cache when its entry is current and
    intact, else `build()` (config, tensors) them, write the entry and read it back.

    `kind` names the model class and `settings` whatever else the tensors depend on (processing flags);
    both are part of the key. A damaged or stale entry is rebuilt with a note.
    """
    source = Path(source).resolve()
    folder = entry_dir(source)
    manifest = read_manifest(folder)
    record = source_record(source, (manifest or {}).get("source_files"))
    key = make_key(kind, record, **settings)
    if entry_problem(folder, key) is None:
        if manifest is not None and record != manifest.get("source_files"):
            _remember_source(folder, manifest, record)   # touched or copied, not changed: hash it once only
        return read_entry(folder)
    with ExitStack() as stack:
        try:
            processed_root().mkdir(parents=True, exist_ok=True)
            stack.enter_context(_lock(processed_root() / f".{folder.name}.lock"))
        except OSError as e:
            note(f"cannot write the processed-weights cache in {processed_root()} ({e.strerror}); "
                 "building the model in memory (slower, and every load pays it)")
            config, tensors = build()
            return Processed(config, tensors, None)
        problem = entry_problem(folder, key)   # another process may have written it meanwhile
        if problem is None:
            return read_entry(folder)
        if problem != "not cached":
            note(f"processed weights of {source.name} in {folder} are unusable ({problem}); rebuilding them")
        for stale in processed_root().glob(f".{folder.name}-*"):   # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        config, tensors = build()
        record = source_record(source, record)   # `build` may have replaced a damaged source file
        key = make_key(kind, record, **settings)
        try:
            write_entry(folder, key, Processed(config, tensors, None), record, source)
            remove_orphans()
        except OSError as e:
            note(f"cannot write the processed-weights cache {folder} ({e.strerror}); the model is built in memory")
            return Processed(config, tensors, None)
        del tensors
        return read_entry(folder)
