"""Where weights come from: safetensors files (read shard by shard) or random values of a shape."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open


class WeightSource(Protocol):
    def get(self, name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        """The tensor called name, or only the given rows/columns of it."""
        ...

    def has(self, name: str) -> bool: ...


class SafetensorsWeights:
    """Reads only the requested slices from one or many .safetensors files."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            single = model_dir / "model.safetensors"
            with safe_open(str(single), framework="pt") as handle:
                files = {name: single for name in handle.keys()}
        self._files = files
        self._handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        tensor_slice = self._handles[self._files[name]].get_slice(name)
        row_slice = slice(None) if rows is None else slice(rows.start, rows.stop)
        if cols is None:
            return tensor_slice[row_slice]
        return tensor_slice[row_slice, cols.start : cols.stop]


class RandomWeights:
    """Random values of the shapes a model needs, for benchmarks and tests: speed does not depend on them.

    Each tensor is drawn whole from a generator seeded by (seed, name) and then sliced, so every
    tensor-parallel layout sees the same model.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self._shapes = shapes
        self._seed = seed
        self._device, self._dtype = device, dtype

    def has(self, name: str) -> bool:
        return name in self._shapes

    def get(self, name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight")):
            full = torch.ones(shape, device=self._device, dtype=self._dtype)
        else:
            seed = (self._seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
            generator = torch.Generator(device=self._device).manual_seed(seed)
            full = torch.randn(shape, generator=generator, device=self._device, dtype=torch.float32)
            # Values are bfloat16-representable whatever the compute dtype, so a float32 run and a
            # bfloat16 run hold the same model.
            full = full.mul_(shape[-1] ** -0.5).to(torch.bfloat16).to(self._dtype)
        if rows is not None:
            full = full[rows.start : rows.stop]
        if cols is not None:
            full = full[:, cols.start : cols.stop]
        return full.contiguous()
