"""Frozen-prefix features, computed once and reused by every epoch, stage, strategy and later run.

A frozen prefix (blocks[:k] in inference mode) is a pure function of its input, so its output for an image
is stored under a key that covers everything that could change it: backbone, weights, preprocessing,
block index, augmentation view and the identity (path, size, mtime) of every file. Arrays live in RAM up to
a budget and are memory-mapped from disk beyond it. A file only gets its final name once fully written,
so a run killed halfway never leaves a cache that reads back as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def default_dir() -> Path:
    return Path(os.environ.get("TRANSFERLAB_CACHE", Path.home() / ".cache" / "transferlab" / "features"))


def scan_record(root: Path, directory: Path | None = None) -> Path:
    """Where `data.scan` keeps its verdicts on a folder's files, so that the next command skips decoding them."""
    return (directory or default_dir()) / "scans" / f"{digest({'root': str(Path(root).resolve())})}.json"


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureCache:
    """Key (a JSON-able dict) -> float16 array of shape [images, *feature shape]."""

    def __init__(self, directory: Path | None, ram_bytes: int):
        self.directory, self.ram_bytes = directory, ram_bytes
        self._ram: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.npy"

    def load(self, key: dict) -> np.ndarray | None:
        name = digest(key)
        if name in self._ram:
            self.hits += 1
            return self._ram[name]
        if self.directory is None or not self._path(name).exists():
            return None
        array = np.load(self._path(name), mmap_mode="r")
        if array.nbytes <= self.ram_bytes:
            array = self._keep(name, np.ascontiguousarray(array))
        self.hits += 1
        return array

    def _keep(self, name: str, array: np.ndarray) -> np.ndarray:
        self._ram[name] = array
        while sum(a.nbytes for a in self._ram.values()) > self.ram_bytes and len(self._ram) > 1:
            self._ram.popitem(last=False)
        return array

    def compute(self, key: dict, batches: Batches, count: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Fill a new array with fn(batch) for every batch, store it under `key` and return it."""
        self.misses += 1
        name = digest(key)
        array, tmp, pos = None, None, 0
        for x, _ in batches:
            out = fn(x).half().numpy()
            if array is None:
                shape = (count, *out.shape[1:])
                nbytes = int(np.prod(shape)) * 2
                if nbytes > self.ram_bytes and self.directory is not None:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    tmp = self.directory / f"{name}.{os.getpid()}.partial.npy"
                    array = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
                else:
                    array = np.empty(shape, np.float16)
            array[pos:pos + len(out)] = out
            pos += len(out)
        assert array is not None and pos == count, "feature batches did not cover every image"
        if self.directory is None:
            return self._keep(name, array)
        self.directory.mkdir(parents=True, exist_ok=True)
        if tmp is None:
            tmp = self.directory / f"{name}.{os.getpid()}.partial.npy"
            np.save(tmp, array)
            os.replace(tmp, self._path(name))
            return self._keep(name, array)
        array.flush()
        del array
        os.replace(tmp, self._path(name))
        return np.load(self._path(name), mmap_mode="r")
