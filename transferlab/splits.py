"""A run's images: the training, validation and optional test folders, scanned, split and checked for leakage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import cache, data
from .config import TrainConfig
from .data import ImageSet
from .progress import note


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None = None
    duplicates: list[dict] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def summary(self) -> dict:
        named = {"train": self.train, "val": self.val} | ({"test": self.test} if self.test else {})
        return {
            "classes": self.classes,
            "counts": {k: v.counts() for k, v in named.items()},
            "skipped": [
                {"split": k, "path": s.path, "reason": s.reason} for k, v in named.items() for s in v.skipped
            ],
            "duplicates": self.duplicates,
        }

    def fingerprint(self) -> str:
        """Which bytes are in which split, with which label: what a resumed run must find unchanged."""
        content = [(s.digests, s.labels) for s in (self.train, self.val)]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def load_splits(config: TrainConfig, test: str | None = None) -> Splits:
    """Scan and validate the folders, split off validation if needed, and look for cross-split duplicates."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else None

    def scan(folder: str | Path, classes: list[str] | None = None) -> ImageSet:
        return data.scan(folder, classes, config.max_pixels, config.workers, cache.scan_record(folder, cache_dir))

    layout = data.resolve(config.data)
    if layout.val is not None:  # a dataset root: say which folder is used for what
        used = {"training": layout.train} | ({"validation": layout.val} if not config.val else {}) \
            | ({"testing": layout.test} if layout.test and test is None else {})
        note(f"{layout.train.parent} holds split folders: "
             + ", ".join(f"{path.name}/ for {role}" for role, path in used.items()))
    test = test or (layout.test and str(layout.test))
    images = scan(layout.train)
    val_dir = config.val or (layout.val and str(layout.val))
    if val_dir:
        train_set = images
        val_set = scan(val_dir, images.classes)
    else:
        data.require_trainable(images)
        train_set, val_set = data.split(images, config.val_split, config.seed)
        train_set.skipped = images.skipped
    data.require_trainable(train_set)
    data.require_trainable(val_set, "validation data")
    test_set = scan(test, images.classes) if test else None
    named = {"train": train_set, "val": val_set} | ({"test": test_set} if test_set else {})
    return Splits(train_set, val_set, test_set, data.duplicates(named))
