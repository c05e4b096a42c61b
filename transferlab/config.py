"""The one dataclass that describes a training run; saved as config.json in every run directory.

Light on purpose: reading a config imports neither torch nor the image stack, so the constants that other
modules check against live here.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import TransferlabError
from .strategies import STRATEGIES

HEADS = ("gap", "flatten")
AUGMENTATIONS = ("none", "light", "standard")
PRECISIONS = ("bf16", "fp16", "off")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """What to train and how. Speed switches left at None are decided by the device (`devices.resolve`): they
    change how fast a run is, never what it computes beyond floating-point rounding."""

    data: str
    val: str | None = None
    val_split: float = 0.2
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    strategy: str = "two-stage"
    unfreeze_blocks: int | None = 1  # last N blocks for partial and two-stage; None = all
    epochs: int = 10
    head_epochs: int | None = None  # two-stage stage one; None = same as epochs (early stopping ends it)
    patience: int = 3  # early stopping on validation loss; 0 = off
    batch_size: int = 32
    image_size: int | None = None  # None = the backbone's pretrained size
    augment: str = "none"
    head: str = "gap"
    dropout: float = 0.2
    lr: float | None = None  # head learning rate; None = strategy default
    backbone_lr: float | None = None
    lr_decay: float = 1.0
    train_bn: bool = False  # BatchNorm statistics update in trained blocks (always on for scratch)
    seed: int = 0
    cache: bool = True
    cache_views: int = 2  # augmented views cached per image when augment != none
    cache_dir: str | None = None  # None = $TRANSFERLAB_CACHE or ~/.cache/transferlab/features
    cache_ram_gb: float = 4.0
    cache_max_gb: float = 20.0  # the cache directory's size cap, kept by removing least recently used entries
    device: str = "auto"
    amp: str | None = None  # autocast dtype: bf16, fp16 or off; None = the device's fastest
    channels_last: bool | None = None
    fold_bn: bool | None = None
    gpu_decode: bool | None = None  # decode JPEGs on the GPU (nvjpeg); CUDA only
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"),
            (self.epochs >= 1, f"--epochs must be a positive number, got {self.epochs}"),
            (self.head_epochs is None or self.head_epochs >= 1, "--head-epochs must be a positive number"),
            (self.patience >= 0, "--patience must be 0 (off) or more"),
            (self.batch_size >= 1, "--batch-size must be a positive number"),
            (self.image_size is None or self.image_size >= 32, "--image-size must be at least 32"),
            (self.augment in AUGMENTATIONS, f"--augment must be one of {', '.join(AUGMENTATIONS)}"),
            (self.head in HEADS, f"--head must be one of {', '.join(HEADS)}"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (0 < self.val_split < 1, "--val-split must be between 0 and 1"),
            (self.cache_views >= 1, "--cache-views must be a positive number"),
            (self.cache_ram_gb >= 0, "--cache-ram-gb must be 0 (memory-map everything) or more"),
            (self.cache_max_gb >= 0, "--cache-max-gb must be 0 (keep only what this run uses) or more"),
            (self.unfreeze_blocks is None or self.unfreeze_blocks >= 1, "--unfreeze-blocks must be positive or 'all'"),
            (all(x is None or x > 0 for x in (self.lr, self.backbone_lr)), "learning rates must be positive"),
            (self.lr_decay > 0, "--lr-decay must be positive"),
            (DEVICE.fullmatch(self.device) is not None,
             f"--device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}"),
            (self.amp is None or self.amp in PRECISIONS, f"--amp must be one of {', '.join(PRECISIONS)}"),
            (self.workers is None or self.workers >= 0, "--workers must be 0 (decode in this process) or more"),
            (self.max_pixels >= 1, "--max-pixels must be a positive number"),
        ]
        for ok, message in checks:
            if not ok:
                raise TransferlabError(message)
        if self.strategy == "scratch":
            self.weights = "none"

    @classmethod
    def from_options(cls, data: str | Path, **options) -> TrainConfig:
        """A config from the Python API's keyword options; a misspelled one is named with what it may mean."""
        known = [f.name for f in fields(cls) if f.name != "data"]
        for name in options:
            if name not in known:
                guess = difflib.get_close_matches(name, known, 1)
                raise TransferlabError(f"unknown option {name!r}" + (f"; did you mean {guess[0]!r}?" if guess else "")
                                       + f" (options: {', '.join(known)})")
        return cls(data=str(data), **options)

    @property
    def bn_frozen(self) -> bool:
        return not self.train_bn and self.strategy != "scratch"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
