"""The frozen-prefix feature cache: RAM vs memory-map, persistence, keys, half-written files, views, the size cap,
clearing, and commands sharing the directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

import transferlab as tl
from transferlab import cache, cli, data, feeds
from transferlab.cache import FeatureCache, clear, digest, entries


def _batches(n: int, width: int = 4):
    for i in range(0, n, 3):
        x = torch.arange(i, min(i + 3, n), dtype=torch.float32)[:, None].repeat(1, width)
        yield x, None


def test_small_arrays_stay_in_ram_and_persist(tmp_path):
    store = FeatureCache(tmp_path, ram_bytes=10_000)
    key = {"block": 3, "files": ["a", "b"]}
    array = store.compute(key, _batches(10), 10, lambda x: x * 2)
    assert not isinstance(array, np.memmap) and array[7, 0] == 14
    again = FeatureCache(tmp_path, ram_bytes=10_000).load(key)  # a later run
    assert np.array_equal(again, array)
    assert FeatureCache(tmp_path, 10_000).load({**key, "block": 4}) is None


def test_large_arrays_spill_to_a_memory_map(tmp_path):
    store = FeatureCache(tmp_path, ram_bytes=16)
    array = store.compute({"k": 1}, _batches(10), 10, lambda x: x)
    assert isinstance(array, np.memmap) and array[9, 3] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{digest({'k': 1})}.{ext}" for ext in ("json", "npy")]


def test_a_half_written_cache_is_never_read(tmp_path):
    key = {"k": 2}

    def killed(x):
        if x[0, 0] >= 6:
            raise KeyboardInterrupt
        return x

    store = FeatureCache(tmp_path, ram_bytes=16)
    try:
        store.compute(key, _batches(10), 10, killed)
    except KeyboardInterrupt:
        pass
    assert FeatureCache(tmp_path, 16).load(key) is None
    assert all(p.name.endswith(".partial.npy") for p in tmp_path.iterdir())


def test_a_changed_file_misses_the_cache(folder, tiny):
    first = tl.train(folder, strategy="feature-extraction", **tiny)
    assert first.info["cache"]["misses"] == 2  # train and validation features
    assert tl.train(folder, strategy="feature-extraction", **tiny).info["cache"]["misses"] == 0
    touched = folder / "cats" / "cats_1.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert tl.train(folder, strategy="feature-extraction", **tiny).info["cache"]["misses"] == 1  # train only


def _count_decoding_passes(monkeypatch) -> list:
    """One entry per pass over decoded images (a training epoch, a validation pass, a cache fill)."""
    calls, original = [], feeds.Images.__iter__
    monkeypatch.setattr(feeds.Images, "__iter__", lambda self: calls.append(self) or original(self))
    return calls


def test_two_stage_decodes_images_once(folder, tiny, monkeypatch):
    """Stage two's shallower features are computed first; stage one's come from them, not from images."""
    calls = _count_decoding_passes(monkeypatch)
    run = tl.train(folder, strategy="two-stage", unfreeze_blocks=3, **tiny)
    assert run.info["cache"]["misses"] == 4  # blocks 6 and 9, train and validation each
    assert len(calls) == 2


def test_augmented_views_are_reproducible_and_differ(folder, tiny):
    run = tl.train(folder, strategy="feature-extraction", augment="standard", cache_views=3, **tiny)
    assert run.info["cache"] | {"hits": 0} == {"used": True, "views": 3, "augment": "standard", "hits": 0, "misses": 4}
    images = data.scan(folder)
    view = lambda v: feeds.ImageDataset(images, run.preprocessing, "standard", seed=0)[5, v][0]  # noqa: E731
    assert torch.equal(view(1), view(1)) and not torch.equal(view(0), view(1))


def test_with_nothing_frozen_unaugmented_images_are_decoded_once_with_the_same_result(folder, tiny, monkeypatch):
    calls = _count_decoding_passes(monkeypatch)
    options = tiny | {"strategy": "full", "epochs": 3, "patience": 0}
    once = tl.train(folder, **options)
    assert len(calls) == 2  # train and validation, for 3 epochs and the final evaluation
    calls.clear()
    every_epoch = tl.train(folder, cache=False, **options)
    assert len(calls) == 3 * 2 + 1
    assert [h["val_loss"] for h in once.history] == [h["val_loss"] for h in every_epoch.history]
    images = data.scan(folder)
    assert np.array_equal(once.probabilities(images), every_epoch.probabilities(images))
    calls.clear()
    tl.train(folder, cache_ram_gb=1e-6, **options)  # beyond the RAM budget: decoded every epoch
    assert len(calls) == 3 * 2 + 1


# ---------------------------------------------------------------- size cap, clearing, sharing


def _entry(store: FeatureCache, i: int) -> np.ndarray:
    return store.compute({"i": i}, _batches(10, 64), 10, lambda x: x + i, {"backbone": "b", "dataset": "d"})


def _kept(directory, keys) -> set:
    return {i for i in keys if (directory / f"{digest({'i': i})}.npy").exists()}


def _used(directory, i: int, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(directory / f"{digest({'i': i})}.json", (when, when))


def test_the_cap_removes_least_recently_used_entries_but_never_one_in_use(tmp_path):
    earlier = FeatureCache(tmp_path, ram_bytes=0)
    for i in range(3):
        _entry(earlier, i)
    earlier.close()
    size = (tmp_path / f"{digest({'i': 0})}.npy").stat().st_size
    other = FeatureCache(tmp_path, ram_bytes=0)  # another command, reading entry 0
    assert other.load({"i": 0}) is not None
    for i in range(3):
        _used(tmp_path, i, 300 - 100 * i)  # entry 0 least recently used
    store = FeatureCache(tmp_path, ram_bytes=0, max_bytes=int(3.5 * size))
    _entry(store, 3)
    _entry(store, 4)
    assert _kept(tmp_path, range(5)) == {0, 3, 4}  # 1 and 2 made way; 0 is older but in use
    other.close()
    _entry(store, 5)
    assert _kept(tmp_path, range(6)) == {3, 4, 5}
    assert np.array_equal(store.load({"i": 4})[:, 0], np.arange(10) + 4)


def test_clear_removes_entries_nobody_uses_and_what_killed_runs_left_but_never_a_file_being_written(tmp_path):
    def clearing_midway(x):  # another command clears while this one writes its memory-mapped file
        if x[0, 0] == 3:
            assert clear(tmp_path) == ([], []) and len(list(tmp_path.glob("*.partial.npy"))) == 1
        return x

    written = FeatureCache(tmp_path, ram_bytes=0).compute({"i": 0}, _batches(10), 10, clearing_midway)
    assert written[9, 0] == 9
    store = FeatureCache(tmp_path, ram_bytes=0)
    for i in range(1, 3):
        _entry(store, i)
    store.close()
    holder = FeatureCache(tmp_path, ram_bytes=0)
    holder.load({"i": 1})
    for i in range(2):
        _used(tmp_path, i, 3 * 86400)
    killed = tmp_path / f"{digest({'i': 9})}.4242.partial.npy"  # nobody holds its lock
    killed.write_bytes(b"half")
    removed, busy = clear(tmp_path, older_than_days=2)
    assert [e.name for e in removed] == [digest({"i": 0})] and [e.name for e in busy] == [digest({"i": 1})]
    assert not killed.exists()
    removed, busy = clear(tmp_path)
    assert [e.name for e in removed] == [digest({"i": 2})] and [e.name for e in busy] == [digest({"i": 1})]
    holder.close()
    assert [e.name for e in clear(tmp_path)[0]] == [digest({"i": 1})]
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


SHARING = """
import importlib.util, sys, time
from pathlib import Path
import numpy as np
import torch

spec = importlib.util.spec_from_file_location("cache", sys.argv[5])  # the module alone: the package's imports
sys.modules["cache"] = cache = importlib.util.module_from_spec(spec)  # would take seconds per process
spec.loader.exec_module(cache)
FeatureCache = cache.FeatureCache
directory, me, other, cap = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

def batches(value):
    for _ in range(5):
        yield torch.full((10, 256), float(value)), None

def signal_and_wait(step):
    (directory.parent / f"{me}.{step}").touch()
    while not (directory.parent / f"{other}.{step}").exists():
        time.sleep(0.01)

store = FeatureCache(directory, ram_bytes=0, max_bytes=cap)
signal_and_wait("ready")
arrays = [store.compute({"p": me, "i": i}, batches(i), 50, lambda x: x) for i in range(3)]
shared = store.load({"shared": 1})
if shared is None:
    shared = store.compute({"shared": 1}, batches(7), 50, lambda x: x)
signal_and_wait("done")  # both have trimmed: every entry either uses must still be there
for i, array in enumerate(arrays):
    assert (np.asarray(array) == i).all() and (store.load({"p": me, "i": i}) == i).all()
assert (np.asarray(shared) == 7).all() and (store.load({"shared": 1}) == 7).all()
"""


def test_two_commands_sharing_the_cache_at_once_never_lose_what_they_use(tmp_path):
    directory = tmp_path / "features"
    earlier = FeatureCache(directory, ram_bytes=0)
    for i in range(4):
        earlier.compute({"i": i}, ((torch.zeros(10, 256), None) for _ in range(5)), 50, lambda x: x)
    earlier.close()
    for i in range(4):
        _used(directory, i, 400 - 100 * i)
    size = (directory / f"{digest({'i': 0})}.npy").stat().st_size
    # 4 earlier entries + 3 from each command + 1 both use: a cap of 2.5 removes all the earlier ones, and would
    # remove the commands' own next, least recently used first, if they were not in use
    commands = [subprocess.Popen([sys.executable, "-c", SHARING, str(directory), me, other, str(int(2.5 * size)),
                                  cache.__file__], stderr=subprocess.PIPE, text=True)
                for me, other in (("a", "b"), ("b", "a"))]
    for command in commands:
        assert command.wait(timeout=300) == 0, command.stderr.read()
    assert _kept(directory, range(4)) == set()
    assert len(entries(directory)) == 7 and not list(directory.glob("*.partial.npy"))


def test_the_cache_command_and_the_cap_a_run_keeps(folder, tiny, tmp_path, capsys):
    directory = tmp_path / "cache"
    tl.train(folder, strategy="feature-extraction", cache_max_gb=0, **tiny)
    first = {e.name for e in entries(directory)}
    assert len(first) == 2  # train and validation features: in use while the run ran, so a cap of 0 kept them
    tl.train(folder, strategy="feature-extraction", cache_max_gb=0, **tiny | {"seed": 1})
    second = {e.name for e in entries(directory)}
    assert len(second) == 2 and not first & second  # the first run's, unused now, made way

    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"mobilenetv2_100  {folder}: " in out and "in 2 entries" in out and "default 20 GiB" in out
    assert len(re.findall(r"block 9, \d+ images .* last used \d{4}-\d\d-\d\d \d\d:\d\d", out)) == 2
    assert cli.main(["cache", "clear", "--older-than", "1"]) == 0 and "removed 0 entries" in capsys.readouterr().out
    assert cli.main(["cache", "clear", "--cache-dir", str(directory)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and entries(directory) == []
