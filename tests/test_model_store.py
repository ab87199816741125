"""The converted-model cache (inflight/model_store.py) on the embedded GGUF: one conversion per content.

A reinstalled wheel or a fresh virtual environment puts the same GGUF at another path with another mtime;
it must reuse the folder already converted, not add another half gigabyte to the cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from inflight.model_store import embedded_gguf_path, prepare_gguf


def folders(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_copies_of_a_file_share_one_conversion_and_a_changed_file_gets_its_own(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copyfile(embedded_gguf_path(), copy)
    os.utime(second, ns=(1_000_000_000, 1_000_000_000))  # another mtime, as a reinstall gives

    converted = prepare_gguf(first, cache, "model")
    made = (converted / "config.json").stat().st_mtime_ns
    assert prepare_gguf(second, cache, "model") == converted
    assert prepare_gguf(first, cache, "model") == converted
    assert folders(cache) == [converted] and (converted / "config.json").stat().st_mtime_ns == made

    shutil.rmtree(cache / ".files")  # the markers lost: found again by content, not converted again
    assert prepare_gguf(second, cache, "model") == converted
    assert folders(cache) == [converted] and (converted / "config.json").stat().st_mtime_ns == made

    with open(second, "r+b") as file:  # the file rewritten with other weights: a conversion of its own
        file.seek(-64, os.SEEK_END)
        tail = file.read(64)
        file.seek(-64, os.SEEK_END)
        file.write(bytes(b ^ 0x11 for b in tail))
    changed = prepare_gguf(second, cache, "model")
    assert changed != converted and folders(cache) == sorted([converted, changed])
    assert (changed / "config.json").exists()
