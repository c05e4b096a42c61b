"""Training: build the model, feed each stage from images or from cached frozen-prefix features, fit.

The fit loop knows nothing about caching: a stage gets a *feed* whose batches enter the model at block
`start` (0 for images). With the cache on, `start` is the first trainable block, so frozen blocks run once
per image (per augmented view) for the whole run instead of once per image per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import backbones, cache, data, metrics, weights
from .cache import FeatureCache
from .config import TrainConfig
from .data import ImageSet, Preprocessing
from .errors import TransferlabError
from .model import Classifier, make_head
from .runs import Run, check_writable
from .strategies import Stage, param_groups, stages


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(enabled: bool):
    dev = device().type
    return torch.autocast(dev, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One logit with BCE for two classes, softmax cross-entropy for more."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return F.cross_entropy(logits, y)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[N, classes] probabilities whether the head has one logit (binary) or one per class."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], 1)
    return logits.softmax(1)


# ---------------------------------------------------------------- data & model


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


def load_splits(config: TrainConfig, test: str | None = None) -> Splits:
    """Scan and validate the folders, split off validation if needed, and look for cross-split duplicates."""
    train_dir, named_val = data.resolve(config.data)
    images = data.scan(train_dir, max_pixels=config.max_pixels, workers=config.workers)
    val_dir = config.val or (named_val and str(named_val))
    if val_dir:
        train_set = images
        val_set = data.scan(val_dir, classes=images.classes, max_pixels=config.max_pixels, workers=config.workers)
    else:
        data.require_trainable(images)
        train_set, val_set = data.split(images, config.val_split, config.seed)
        train_set.skipped = images.skipped
    data.require_trainable(train_set)
    data.require_trainable(val_set, "validation data")
    test_set = data.scan(test, classes=images.classes, max_pixels=config.max_pixels) if test else None
    named = {"train": train_set, "val": val_set} | ({"test": test_set} if test_set else {})
    return Splits(train_set, val_set, test_set, data.duplicates(named))


@dataclass
class Built:
    model: Classifier
    pre: Preprocessing
    block_names: list[str]
    feature_shape: list[int]
    weights_source: str


def build_model(config: TrainConfig, num_classes: int, load_weights: bool = True) -> Built:
    """Backbone blocks + a fresh head, seeded (a random-init backbone too); weights loaded unless rebuilding."""
    torch.manual_seed(config.seed)
    backbone, timm_model = backbones.create(config.backbone, config.image_size)
    pre = backbones.preprocessing(backbone.pretrained_cfg, config.image_size)
    source = weights.load(timm_model, config.backbone, config.weights) if load_weights else config.weights
    head = make_head(config.head, backbone.feature_shape, 1 if num_classes == 2 else num_classes, config.dropout)
    model = Classifier(backbone.blocks, head, pre).to(device())
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Built(model, pre, backbone.block_names, backbone.feature_shape, source)


# ---------------------------------------------------------------- feeds


def _to_device(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.to(device(), non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of an epoch: the same with or without the cache, and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def image_loader(images: ImageSet, pre: Preprocessing, config: TrainConfig, augment: str = "none",
                 order: list[int] | None = None, view: int | None = None) -> torch.utils.data.DataLoader:
    """Decode and resize in worker processes; uint8 batches (normalisation happens in the model).

    `view` seeds augmentation per (seed, view, image) so a cached view is reproducible. The loader gets its
    own generator so that it never draws from (and shifts) the global RNG that dropout uses.
    """
    workers = config.workers if config.workers is not None else min(os.cpu_count() or 1, 4)
    dataset = data.ImageDataset(images, pre, augment, config.max_pixels,
                                seed=None if view is None else config.seed, view=view or 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=order, generator=torch.Generator().manual_seed(config.seed),
        num_workers=workers, prefetch_factor=4 if workers else None,
    )


class ImageFeed:
    """Batches of images, augmented afresh every epoch; the whole model runs on them."""

    start = 0

    def __init__(self, splits: Splits, pre: Preprocessing, config: TrainConfig):
        self.splits, self.pre, self.config = splits, pre, config

    def train(self, epoch: int) -> Iterable:
        order = epoch_order(len(self.splits.train), self.config.seed, epoch)
        return image_loader(self.splits.train, self.pre, self.config, self.config.augment, order)

    def val(self) -> Iterable:
        return image_loader(self.splits.val, self.pre, self.config)


class CachedFeed:
    """Batches of cached block-`start` features; epoch e draws augmented view e % views."""

    def __init__(self, start: int, views: list[np.ndarray], labels: list[int], val: np.ndarray,
                 val_labels: list[int], config: TrainConfig):
        self.start, self.views, self.val_features, self.config = start, views, val, config
        self.labels, self.val_labels = torch.tensor(labels), torch.tensor(val_labels)

    def _batches(self, features: np.ndarray, labels: torch.Tensor, order: list[int]) -> Iterator:
        for i in range(0, len(order), self.config.batch_size):
            idx = order[i:i + self.config.batch_size]
            yield torch.from_numpy(features[idx]).float(), labels[idx]

    def train(self, epoch: int) -> Iterator:
        order = epoch_order(len(self.labels), self.config.seed, epoch)
        return self._batches(self.views[epoch % len(self.views)], self.labels, order)

    def val(self) -> Iterator:
        return self._batches(self.val_features, self.val_labels, list(range(len(self.val_labels))))


class Features:
    """Frozen-prefix features of a run's images: from the FeatureCache, or computed now and stored there."""

    def __init__(self, built: Built, config: TrainConfig, store: FeatureCache):
        self.built, self.config, self.store = built, config, store
        self.base = {"backbone": config.backbone, "weights": _weights_identity(config), "pre": asdict(built.pre),
                     "bf16": config.bf16, "max_pixels": config.max_pixels}

    def _key(self, images: ImageSet, block: int, augment: str, view: int) -> dict:
        return {**self.base, "block": block, "augment": augment, "view": view,
                "seed": self.config.seed if augment != "none" else None,
                "files": [(str(p), *_stat(p)) for p in images.files]}

    def get(self, images: ImageSet, block: int, augment: str = "none", view: int = 0) -> np.ndarray:
        if (hit := self.store.load(self._key(images, block, augment, view))) is not None:
            return hit
        # start from the deepest shallower prefix already cached (two-stage, compare), else from images
        start, batches = 0, None
        for j in range(block - 1, 0, -1):
            if (shallower := self.store.load(self._key(images, j, augment, view))) is not None:
                n = self.config.batch_size
                start, batches = j, ((torch.from_numpy(shallower[i:i + n]), None) for i in range(0, len(images), n))
                break
        if batches is None:
            batches = image_loader(images, self.built.pre, self.config, augment,
                                   view=view if augment != "none" else None)
        model = self.built.model.eval()

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(self.config.bf16):
                return model.features(_to_device(x, self.config.channels_last), start, block).float().cpu()

        progress = tqdm(batches, desc=f"caching block {block} features", total=-(-len(images) // self.config.batch_size),
                        leave=False, disable=None)
        return self.store.compute(self._key(images, block, augment, view), progress, len(images), run_blocks)

    def feed(self, splits: Splits, block: int) -> CachedFeed:
        augment = self.config.augment
        views = [self.get(splits.train, block, augment, v) for v in range(self.config.cache_views if augment != "none" else 1)]
        val = self.get(splits.val, block)
        return CachedFeed(block, views, splits.train.labels, val, splits.val.labels, self.config)


def _stat(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _weights_identity(config: TrainConfig) -> str:
    """What decides the weights: their file's identity, or the seed for a random init."""
    if config.weights == "none":
        return f"none/seed={config.seed}"
    path = weights.package_file(config.backbone) if config.weights == "imagenet" else config.weights
    return f"{config.weights}:{path}:{_stat(path) if path and os.path.exists(path) else ''}"


# ---------------------------------------------------------------- fit


def run_epoch(model: Classifier, batches: Iterable, start: int, config: TrainConfig,
              optimizer: torch.optim.Optimizer | None = None, desc: str = "") -> tuple[float, float, torch.Tensor]:
    """One pass: trains when given an optimizer; returns (mean loss, accuracy, probabilities)."""
    training = optimizer is not None
    model.train(training)
    total, correct, count, probs = 0.0, 0, 0, []
    bar = tqdm(batches, desc=desc, leave=False, disable=None)
    with torch.set_grad_enabled(training):
        for x, y in bar:
            y = y.to(device())
            with autocast(config.bf16):
                logits = model(_to_device(x, config.channels_last), start)
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            p = probabilities(logits.detach())
            probs.append(p.cpu())
            total += loss.item() * len(y)
            correct += (p.argmax(1) == y).sum().item()
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.4f}", acc=f"{correct / count:.4f}")
    return total / count, correct / count, torch.cat(probs)


def fit(model: Classifier, stage: Stage, feed: ImageFeed | CachedFeed, config: TrainConfig, history: list[dict],
        stage_no: int) -> int:
    """Train one stage with early stopping on validation loss; restores and returns the best epoch."""
    model.freeze(stage.frozen, config.bn_frozen)
    optimizer = torch.optim.AdamW(param_groups(model.blocks, model.head, stage, config.lr_decay))
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    for epoch in range(stage.epochs):
        torch.manual_seed(config.seed * 1000 + len(history))
        began = time.perf_counter()
        label = f"stage {stage_no} ({stage.name}) epoch {epoch + 1}/{stage.epochs}"
        train_loss, train_acc, _ = run_epoch(model, feed.train(epoch), feed.start, config, optimizer, label)
        val_loss, val_acc, _ = run_epoch(model, feed.val(), feed.start, config, desc="validating")
        row = {"epoch": len(history) + 1, "stage": stage_no, "trained": stage.name, "train_loss": train_loss,
               "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
               "seconds": time.perf_counter() - began}
        history.append(row)
        tqdm.write(f"{label}: loss {train_loss:.4f} acc {train_acc:.4f} | val loss {val_loss:.4f} "
                   f"acc {val_acc:.4f} | {row['seconds']:.1f}s")
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, row["epoch"], 0
            best_state = copy.deepcopy(model.state_dict())
        elif config.patience and (waited := waited + 1) >= config.patience:
            break
    if best_state is None:
        raise TransferlabError("training diverged: the validation loss was never a finite number; try a lower --lr")
    model.load_state_dict(best_state)
    return best_epoch


# ---------------------------------------------------------------- a whole run


def train(config: TrainConfig, out: str | Path | None = None, splits: Splits | None = None,
          store: FeatureCache | None = None, overwrite: bool = False) -> Run:
    """Train with `config`'s strategy, evaluate on validation, and save a run directory to `out`."""
    if out is not None:
        check_writable(Path(out), overwrite)
    splits = splits or load_splits(config)
    built = build_model(config, len(splits.classes))
    model = built.model
    plan = stages(config.strategy, model.num_blocks, config.unfreeze_blocks, config.epochs, config.head_epochs,
                  config.lr, config.backbone_lr)
    store = store or FeatureCache(Path(config.cache_dir) if config.cache_dir else cache.default_dir(),
                                  int(config.cache_ram_gb * 2**30))
    features = Features(built, config, store) if config.cache else None
    history: list[dict] = []
    began = time.perf_counter()
    for number, stage in enumerate(plan, 1):
        use_cache = features is not None and stage.frozen > 0
        feed = features.feed(splits, stage.frozen) if use_cache else ImageFeed(splits, built.pre, config)
        best_epoch = fit(model, stage, feed, config, history, number)
    seconds = time.perf_counter() - began
    _, _, probs = run_epoch(model, feed.val(), feed.start, config, desc="evaluating")
    result = metrics.evaluate(probs.numpy(), np.array(splits.val.labels), splits.classes)
    info = {
        "classes": splits.classes,
        "backbone": {"name": config.backbone, "blocks": built.block_names, "weights": built.weights_source,
                     "feature_shape": built.feature_shape},
        "preprocessing": asdict(built.pre),
        "stages": [asdict(s) for s in plan],
        "trainable_params": model.trainable_params(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "best_epoch": best_epoch,
        "train_seconds": seconds,
        "cache": {"used": config.cache, "views": config.cache_views if config.augment != "none" else 1,
                  "augment": config.augment, "hits": store.hits, "misses": store.misses},
        "data": splits.summary(),
    }
    split = [{"split": name, "path": str(f), "label": s.classes[y]}
             for name, s in (("train", splits.train), ("val", splits.val)) for f, y in zip(s.files, s.labels)]
    run = Run(config, info, model.eval(), history, result, split)
    if out is not None:
        run.save(out, overwrite)
    return run
