"""The frozen-prefix feature cache: RAM vs memory-map, persistence, keys, half-written files, views."""

from __future__ import annotations

import os

import numpy as np
import torch

import transferlab as tl
from transferlab import data, feeds
from transferlab.cache import FeatureCache, digest


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
    assert [p.name for p in tmp_path.iterdir()] == [f"{digest({'k': 1})}.npy"]


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
