"""Frozen-prefix features, computed once and reused by every epoch, stage, strategy and later run.

A frozen prefix (blocks[:k] in inference mode) is a pure function of its input, so its output for an image
is stored under a key that covers everything that could change it: backbone, weights, preprocessing,
block index, augmentation view and the identity (path, size, mtime) of every file. Arrays live in RAM up to
a budget and are memory-mapped from disk beyond it. A file only gets its final name once fully written,
so a run killed halfway never leaves a cache that reads back as complete.

On disk an entry is NAME.npy with a sidecar NAME.json (backbone, dataset, block, view, shape, when it was made);
the sidecar's modification time is when the entry was last used. Commands may share the directory: each holds
a shared lock (flock) on the sidecar of every entry it reads or writes until it is done with the cache, and an
entry is only removed under an exclusive lock taken without waiting, so no command loses an entry it uses. After
each new entry, least recently used entries nobody holds go until the directory fits its size cap; files still
being written are locked too, and those a killed run left behind go with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    """Key (a JSON-able dict) -> float16 array of shape [images, *feature shape]; `max_bytes` caps the directory."""

    def __init__(self, directory: Path | None, ram_bytes: int, max_bytes: int | None = None):
        self.directory, self.ram_bytes, self.max_bytes = directory, ram_bytes, max_bytes
        self._ram: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held: dict[str, int] = {}  # entry name -> its sidecar, share-locked
        self._release = weakref.finalize(self, _close_all, self._held)
        self.hits = self.misses = 0

    def close(self) -> None:
        """Let other commands remove this cache's entries again (also done once it is garbage)."""
        self._release()

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.npy"

    def load(self, key: dict) -> np.ndarray | None:
        name = digest(key)
        if name in self._ram:
            self.hits += 1
            return self._ram[name]
        if self.directory is None or not self._path(name).exists() or not self._hold(name):
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

    def compute(self, key: dict, batches: Batches, count: int, fn: Callable[[torch.Tensor], torch.Tensor],
                about: dict | None = None) -> np.ndarray:
        """Fill a new array with fn(batch) for every batch, store it under `key` and return it; `about` describes
        it in `transferlab cache` (backbone, dataset, ...)."""
        self.misses += 1
        name = digest(key)
        with contextlib.ExitStack() as writing:
            array, tmp, pos = None, None, 0
            for x, _ in batches:
                out = fn(x).half().numpy()
                if array is None:
                    shape = (count, *out.shape[1:])
                    if int(np.prod(shape)) * 2 > self.ram_bytes and self.directory is not None:
                        tmp = writing.enter_context(self._partial(name))
                        array = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
                    else:
                        array = np.empty(shape, np.float16)
                array[pos:pos + len(out)] = out
                pos += len(out)
            assert array is not None and pos == count, "feature batches did not cover every image"
            if self.directory is None:
                return self._keep(name, array)
            if tmp is None:
                tmp = writing.enter_context(self._partial(name))
                np.save(tmp, array)
                array = self._keep(name, array)
            else:
                array.flush()
                array = None
            self._hold(name, {**(about or {}), "shape": list(shape), "created": time.time()})
            os.replace(tmp, self._path(name))
        self._trim()
        return np.load(self._path(name), mmap_mode="r") if array is None else array

    @contextlib.contextmanager
    def _partial(self, name: str) -> Iterator[Path]:
        """A file to write an entry into, locked until it has its final name: only a killed run's can be removed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.{os.getpid()}.partial.npy"
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)

    def _hold(self, name: str, about: dict | None = None) -> bool:
        """Share-lock the entry until this cache is closed, and mark it used now; with `about`, make its sidecar
        first if there is none. False if the entry is not there (or was removed just now)."""
        sidecar = self.directory / f"{name}.json"
        while name not in self._held:
            if about is not None:
                _create(sidecar, about)
            try:
                fd = os.open(sidecar, os.O_RDONLY)
            except FileNotFoundError:
                if about is None:
                    return False
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while someone removes the entry
            if os.fstat(fd).st_nlink:
                self._held[name] = fd
            else:  # removed before we had the lock
                os.close(fd)
                if about is None:
                    return False
        with contextlib.suppress(OSError):  # a cache shared read-only: nothing to record
            os.utime(sidecar)
        return True

    def _trim(self) -> None:
        """Remove what killed runs left half-written, and the least recently used entries that no command holds
        until the directory fits `max_bytes`."""
        if self.directory is None or self.max_bytes is None:
            return
        with _exclusive(self.directory / ".lock"):  # one trimmer at a time, so that two never both remove
            _remove_abandoned(self.directory)
            listed = entries(self.directory)
            total = sum(e.bytes for e in listed)
            for entry in listed:
                if total <= self.max_bytes:
                    break
                if _remove(self.directory, entry.name):
                    total -= entry.bytes


def _close_all(held: dict[str, int]) -> None:
    for fd in held.values():
        os.close(fd)
    held.clear()


def _create(sidecar: Path, about: dict) -> None:
    """Write the sidecar whole, unless there is one: linking a complete file is atomic and never replaces."""
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(about))
    try:
        os.link(tmp, sidecar)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unlocked(path: Path) -> int | None:
    """An exclusive lock on `path` if nobody holds one (the fd to close), else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def _remove(directory: Path, name: str) -> bool:
    """Remove an entry that no command holds; False if one does."""
    sidecar, npy = directory / f"{name}.json", directory / f"{name}.npy"
    if not sidecar.exists():  # from before sidecars: no command holds it
        npy.unlink(missing_ok=True)
        return True
    if (fd := _unlocked(sidecar)) is None:
        return False
    try:
        npy.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _remove_abandoned(directory: Path) -> None:
    """Half-written files whose writer is gone (killed): nobody will finish or read them."""
    for path in directory.glob("*.partial.npy"):
        if (fd := _unlocked(path)) is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


# ---------------------------------------------------------------- what `transferlab cache` shows and clears


@dataclass(frozen=True)
class Entry:
    name: str
    about: dict  # backbone, dataset, block, augment, view, shape, created; {} for entries from before sidecars
    bytes: int
    last_used: float  # seconds since the epoch


def entries(directory: Path) -> list[Entry]:
    """The complete entries in `directory`, least recently used first."""
    listed = []
    for npy in directory.glob("*.npy"):
        if npy.name.endswith(".partial.npy"):
            continue
        sidecar = npy.with_suffix(".json")
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            about, used = (json.loads(sidecar.read_text()), sidecar.stat().st_mtime) if sidecar.exists() \
                else ({}, npy.stat().st_mtime)
            listed.append(Entry(npy.stem, about, npy.stat().st_size, used))
    return sorted(listed, key=lambda e: e.last_used)


def partial_bytes(directory: Path) -> int:
    """Space taken by files being written, or left by killed runs."""
    total = 0
    for path in directory.glob("*.partial.npy"):
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile
            total += path.stat().st_size
    return total


def clear(directory: Path, older_than_days: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove the entries last used more than `older_than_days` ago (all of them without it) that no command
    holds, and what killed runs left half-written; returns (removed, kept because in use)."""
    if not directory.is_dir():
        return [], []
    removed, busy = [], []
    with _exclusive(directory / ".lock"):
        _remove_abandoned(directory)
        for entry in entries(directory):
            if older_than_days is None or time.time() - entry.last_used > older_than_days * 86400:
                (removed if _remove(directory, entry.name) else busy).append(entry)
    return removed, busy
