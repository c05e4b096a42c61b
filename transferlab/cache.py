"""Frozen-prefix features, computed once and reused by every epoch, stage, strategy and later run.

A frozen prefix (blocks[:k] in inference mode) is a pure function of its input, so its output for an image
is stored under a key that covers everything that could change it: backbone, weights, preprocessing,
block index, augmentation view and the identity (path, size, mtime) of every file. Arrays live in RAM up to
a budget and are memory-mapped from disk beyond it. A file only gets its final name once fully written,
so a run killed halfway never leaves a cache that reads back as complete. Under torchrun each process
computes a share of the images and the parts are put together into the file one process would have written.
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

from . import distributed
from .errors import TransferlabError

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
        array = self._read(digest(key))
        if array is not None:
            self.hits += 1
        return array

    def _read(self, name: str) -> np.ndarray | None:
        if name in self._ram:
            return self._ram[name]
        if self.directory is None or not self._path(name).exists():
            return None
        array = np.load(self._path(name), mmap_mode="r")
        if array.nbytes <= self.ram_bytes:
            array = self._keep(name, np.ascontiguousarray(array))
        return array

    def _keep(self, name: str, array: np.ndarray) -> np.ndarray:
        self._ram[name] = array
        while sum(a.nbytes for a in self._ram.values()) > self.ram_bytes and len(self._ram) > 1:
            self._ram.popitem(last=False)
        return array

    def compute(self, key: dict, batches: Batches, count: int, fn: Callable[[torch.Tensor], torch.Tensor],
                shares: list[list[int]] | None = None) -> np.ndarray:
        """Fill a new array with fn(batch) for every batch, store it under `key` and return it.

        Under torchrun, `shares` are every process's rows of the `count`, and this process's batches cover only
        its own: each process stores its part, the main process puts them together into the array one process
        would have stored, and every process then reads that. So the directory must be one they all share.
        """
        self.misses += 1
        name = digest(key)
        if not shares or len(shares) == 1:
            return self._store(name, *self._fill(name, batches, count, fn))
        part = self._part(name, distributed.rank(), len(shares))
        self._store(part, *self._fill(part, batches, len(shares[distributed.rank()]), fn), keep=False)
        distributed.barrier()
        distributed.main_only(self._combine)(name, shares)
        distributed.barrier()
        return self._read(name)

    def _fill(self, name: str, batches: Batches, count: int, fn: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[np.ndarray, Path | None]:
        array, tmp, pos = None, None, 0
        for x, _ in batches:
            out = fn(x).half().numpy()
            if array is None:
                array, tmp = self._new(name, (count, *out.shape[1:]))
            array[pos:pos + len(out)] = out
            pos += len(out)
        assert array is not None and pos == count, "feature batches did not cover every image"
        return array, tmp

    def _new(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, Path | None]:
        """An array to fill: in RAM within the budget, else memory-mapped from a temporary file (returned too)."""
        if int(np.prod(shape)) * 2 > self.ram_bytes and self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f"{name}.{os.getpid()}.partial.npy"
            return np.lib.format.open_memmap(tmp, "w+", np.float16, shape), tmp
        return np.empty(shape, np.float16), None

    def _store(self, name: str, array: np.ndarray, tmp: Path | None, keep: bool = True) -> np.ndarray:
        """Give a filled array its final name; kept in RAM, or memory-mapped from the file when it was."""
        if self.directory is None:
            return self._keep(name, array)
        self.directory.mkdir(parents=True, exist_ok=True)
        if tmp is None:
            tmp = self.directory / f"{name}.{os.getpid()}.partial.npy"
            np.save(tmp, array)
            os.replace(tmp, self._path(name))
            return self._keep(name, array) if keep else array
        array.flush()
        del array
        os.replace(tmp, self._path(name))
        return np.load(self._path(name), mmap_mode="r")

    def _part(self, name: str, rank: int, processes: int) -> str:
        return f"{name}.part-{rank}-of-{processes}"

    def _combine(self, name: str, shares: list[list[int]]) -> None:
        """The parts that the processes stored, as one array in image order; the parts are then removed."""
        paths = [self._path(self._part(name, r, len(shares))) for r in range(len(shares))]
        if missing := [r for r, path in enumerate(paths) if not path.exists()]:
            raise TransferlabError(f"the features that process {missing[0]} computed are not in {self.directory}: "
                                   "under torchrun on several machines --cache-dir must be a folder they all share")
        parts = [np.load(path, mmap_mode="r") for path in paths]
        array, tmp = self._new(name, (sum(map(len, shares)), *parts[0].shape[1:]))
        for rows, part in zip(shares, parts):
            for i in range(0, len(rows), 1024):  # a block at a time: parts can be larger than RAM
                array[rows[i:i + 1024]] = part[i:i + 1024]
        self._store(name, array, tmp)
        for path in paths:
            path.unlink()
