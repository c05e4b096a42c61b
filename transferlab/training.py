"""Training: build the model, feed each stage from images or from cached frozen-prefix features, fit.

The fit loop knows nothing about caching: a stage gets a *feed* whose batches enter the model at block
`start` (0 for images). With the cache on, `start` is the first trainable block, so frozen blocks run once
per image (per augmented view) for the whole run instead of once per image per epoch; with nothing frozen and
no augmentation, the images themselves are decoded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import backbones, cache, data, metrics, precision, weights
from .cache import FeatureCache
from .config import TrainConfig
from .data import ImageSet, Preprocessing
from .errors import TransferlabError
from .model import Classifier, make_head
from .runs import Run, check_writable, checkpoint_path, read_checkpoint, write_checkpoint
from .strategies import Stage, param_groups, stages


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(enabled: bool) -> contextlib.AbstractContextManager:
    return precision.autocast(enabled, device().type)


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
    test_set = data.scan(test, classes=images.classes, max_pixels=config.max_pixels,
                          workers=config.workers) if test else None
    named = {"train": train_set, "val": val_set} | ({"test": test_set} if test_set else {})
    return Splits(train_set, val_set, test_set, data.duplicates(named))


@dataclass
class Built:
    model: Classifier
    pre: Preprocessing
    block_names: list[str]
    feature_shape: list[int]
    weights: dict  # where the weights came from, for config.json


def build_model(config: TrainConfig, num_classes: int, pre: Preprocessing | None = None) -> Built:
    """Backbone blocks + a fresh head, seeded (a random-init backbone too). The weights are loaded and their
    preprocessing used, unless a saved run rebuilds itself with its recorded `pre` (its tensors follow)."""
    torch.manual_seed(config.seed)
    backbone, timm_model = backbones.create(config.backbone, config.image_size)
    loaded = weights.Loaded(config.weights) if pre else weights.load(timm_model, config.backbone, config.weights)
    pre = pre or backbones.preprocessing(backbone.pretrained_cfg | loaded.cfg, config.image_size)
    head = make_head(config.head, backbone.feature_shape, 1 if num_classes == 2 else num_classes, config.dropout)
    model = Classifier(backbone.blocks, head, pre, config.fold_bn).to(device())
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Built(model, pre, backbone.block_names, backbone.feature_shape, loaded.record())


# ---------------------------------------------------------------- feeds


def _to_device(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.to(device(), non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of an epoch: the same with or without the cache, and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def default_workers() -> int:
    """Decoding processes: none on two cores or fewer, where measured throughput is best with decoding between
    batches (worker processes there only contend with the model's threads); else up to four."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(cores - 1, 4)


def image_loader(images: ImageSet, pre: Preprocessing, config: TrainConfig, augment: str = "none",
                 order: list[int] | None = None, view: int | None = None) -> torch.utils.data.DataLoader:
    """Decode and resize in worker processes; uint8 batches (normalisation happens in the model).

    `view` seeds augmentation per (seed, view, image) so a cached view is reproducible. The loader gets its
    own generator so that it never draws from (and shifts) the global RNG that dropout uses.
    """
    workers = config.workers if config.workers is not None else default_workers()
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
    """Batches of cached block-`start` features (start 0: decoded images); epoch e draws augmented view e % views."""

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

    def get(self, images: ImageSet, block: int, augment: str = "none", view: int = 0) -> np.ndarray:
        """Features of blocks[:block] for `images` (augmented view `view`), computed only if not cached."""
        identity = {**self.base, "augment": augment, "view": view,
                    "seed": self.config.seed if augment != "none" else None,
                    "files": [(str(p), *_stat(p)) for p in images.files]}
        if (hit := self.store.load(identity | {"block": block})) is not None:
            return hit
        # start from the deepest shallower prefix already cached (two-stage, compare), else from images
        start, batches, n = 0, None, self.config.batch_size
        for j in range(block - 1, 0, -1):
            if (shallower := self.store.load(identity | {"block": j})) is not None:
                start, batches = j, ((torch.from_numpy(shallower[i:i + n]).float(), None)
                                     for i in range(0, len(images), n))
                break
        if batches is None:
            batches = image_loader(images, self.built.pre, self.config, augment,
                                   view=view if augment != "none" else None)
        model = self.built.model.eval()

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(self.config.bf16):
                return model.features(_to_device(x, self.config.channels_last), start, block).float().cpu()

        progress = tqdm(batches, desc=f"caching block {block} features", total=-(-len(images) // n), leave=False,
                        disable=None)
        about = {"backbone": self.config.backbone, "dataset": str(images.root), "block": block, "augment": augment,
                 "view": view}
        return self.store.compute(identity | {"block": block}, progress, len(images), run_blocks, about)

    def feed(self, splits: Splits, block: int) -> CachedFeed | None:
        """Cached block-`block` features; with nothing frozen (block 0), the images themselves."""
        if block == 0:
            return self.images(splits)
        augment = self.config.augment
        views = range(self.config.cache_views if augment != "none" else 1)
        train = [self.get(splits.train, block, augment, v) for v in views]
        return CachedFeed(block, train, splits.train.labels, self.get(splits.val, block), splits.val.labels,
                          self.config)

    def images(self, splits: Splits) -> CachedFeed | None:
        """Unaugmented images are a pure function of their files too: decoded once and kept in RAM as uint8 for
        every epoch; None with augmentation or beyond the RAM budget (the images are then decoded each epoch)."""
        size = self.built.pre.size
        if self.config.augment != "none" or (len(splits.train) + len(splits.val)) * 3 * size**2 > self.store.ram_bytes:
            return None

        def decode(images: ImageSet) -> np.ndarray:
            return torch.cat([x for x, _ in image_loader(images, self.built.pre, self.config)]).numpy()

        return CachedFeed(0, [decode(splits.train)], splits.train.labels, decode(splits.val), splits.val.labels,
                          self.config)


def feature_store(config: TrainConfig) -> FeatureCache:
    """The cache that `config` asks for; share one between runs (as `compare` does) to share features in RAM."""
    directory = Path(config.cache_dir) if config.cache_dir else cache.default_dir()
    return FeatureCache(directory, int(config.cache_ram_gb * 2**30), int(config.cache_max_gb * 2**30))


def _stat(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _weights_identity(config: TrainConfig) -> str:
    """What decides the weights: their file's identity, or the seed for a random init."""
    if config.weights == "none":
        return f"none/seed={config.seed}"
    path = weights.imagenet_file(config.backbone) if config.weights == "imagenet" else config.weights
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says what was kept and how to continue."""


@dataclass
class Progress:
    """Where a run stands in its current stage. Checkpointed with its tensors after every epoch, it lets an
    interrupted run continue exactly: each epoch's randomness derives from (seed, epoch), so no RNG state
    needs saving."""

    stage: int = 0  # index into the plan
    epoch: int = 0  # epochs finished in this stage
    best_loss: float = math.inf
    best_epoch: int = 0
    waited: int = 0  # epochs since the validation loss last improved
    seconds: float = 0.0  # training time so far, across interruptions
    history: list[dict] = field(default_factory=list)
    model: dict[str, torch.Tensor] | None = None  # when resuming: the trained tensors as checkpointed
    best: dict[str, torch.Tensor] | None = None  # the trained tensors at best_epoch
    optimizer: dict[int, dict[str, torch.Tensor]] | None = None  # per-parameter optimizer state
    _tensor_fields = ("model", "best", "optimizer")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._tensor_fields}

    def tensors(self, model: Classifier) -> dict[str, torch.Tensor]:
        """The trained tensors now and at the best epoch, and the optimizer state, flat for a safetensors file."""
        flat = {f"model.{k}": v for k, v in trained_state(model).items()}
        flat |= {f"best.{k}": v for k, v in (self.best or {}).items()}
        return flat | {f"optimizer.{i}.{k}": v for i, s in (self.optimizer or {}).items() for k, v in s.items()}

    @classmethod
    def restore(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> Progress:
        """The inverse of `to_json` and `tensors`."""
        parts: dict[str, dict] = {name: {} for name in cls._tensor_fields}
        for key, value in tensors.items():
            part, name = key.split(".", 1)
            if part == "optimizer":
                index, name = name.split(".", 1)
                parts[part].setdefault(int(index), {})[name] = value
            else:
                parts[part][name] = value
        return cls(**meta, **parts)


def trained_state(model: Classifier) -> dict[str, torch.Tensor]:
    """A copy of what training can change: the head and the blocks after the frozen prefix. Frozen blocks keep
    their weights and (in inference mode) their BatchNorm statistics, and the prefix only shrinks from stage to
    stage, so best-restore and checkpoints need no more; for feature extraction that is the head alone."""
    trained = [("head", model.head)] + [(f"blocks.{i}", model.blocks[i]) for i in range(model.frozen, model.num_blocks)]
    return {k: v.clone() for name, module in trained for k, v in module.state_dict(prefix=f"{name}.").items()}


def fit(model: Classifier, stage: Stage, feed: ImageFeed | CachedFeed, config: TrainConfig, progress: Progress,
        on_epoch: Callable[[Progress], None] | None = None) -> None:
    """Train one stage from where `progress` stands, with early stopping on validation loss; restores the best
    weights.

    `on_epoch` gets the progress after every epoch, to checkpoint it.
    """
    model.freeze(stage.frozen, config.bn_frozen)
    optimizer = torch.optim.AdamW(param_groups(model.blocks, model.head, stage, config.lr_decay))
    if progress.optimizer:
        optimizer.load_state_dict({"state": progress.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
    history = progress.history
    while progress.epoch < stage.epochs and not (config.patience and progress.waited >= config.patience):
        torch.manual_seed(config.seed * 1000 + len(history))
        began = time.perf_counter()
        label = f"stage {progress.stage + 1} ({stage.name}) epoch {progress.epoch + 1}/{stage.epochs}"
        train_loss, train_acc, _ = run_epoch(model, feed.train(progress.epoch), feed.start, config, optimizer, label)
        val_loss, val_acc, _ = run_epoch(model, feed.val(), feed.start, config, desc="validating")
        row = {"epoch": len(history) + 1, "stage": progress.stage + 1, "trained": stage.name,
               "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
               "seconds": time.perf_counter() - began}
        history.append(row)
        tqdm.write(f"{label}: loss {train_loss:.4f} acc {train_acc:.4f} | val loss {val_loss:.4f} "
                   f"acc {val_acc:.4f} | {row['seconds']:.1f}s")
        progress.epoch += 1
        if val_loss < progress.best_loss:
            progress.best_loss, progress.best_epoch, progress.waited = val_loss, row["epoch"], 0
            progress.best = trained_state(model)
        else:
            progress.waited += 1
        progress.optimizer = optimizer.state_dict()["state"]
        if on_epoch:
            on_epoch(progress)
    if not progress.best:
        raise TransferlabError("training diverged: the validation loss was never a finite number; try a lower --lr")
    model.load_state_dict(progress.best, strict=False)


# ---------------------------------------------------------------- a whole run


def train(config: TrainConfig, out: str | Path | None = None, splits: Splits | None = None,
          store: FeatureCache | None = None, overwrite: bool = False, progress: Progress | None = None) -> Run:
    """Train with `config`'s strategy, evaluate on validation, and save a run directory to `out`.

    With `out`, every epoch is checkpointed beside it, so Ctrl-C or SIGTERM stops with an `Interrupted` that
    `resume(out)` continues from; `progress` is that continuation's starting point.
    """
    checkpoint = None if out is None else checkpoint_path(Path(out))
    if checkpoint and not progress:
        check_writable(Path(out), overwrite)
        if checkpoint.exists() and not overwrite:
            raise TransferlabError(f"{out} has an interrupted run: continue it with `transferlab train --resume {out}`"
                                   " or pass --overwrite to start again")
    splits = splits or load_splits(config)
    built = build_model(config, len(splits.classes))
    model = built.model
    plan = stages(config.strategy, model.num_blocks, config.unfreeze_blocks, config.epochs, config.head_epochs,
                  config.lr, config.backbone_lr)
    store = store or feature_store(config)
    features = Features(built, config, store) if config.cache else None
    if progress:
        model.load_state_dict(progress.model, strict=False)
    elif checkpoint:
        checkpoint.unlink(missing_ok=True)  # an interrupted run that --overwrite replaces
    progress = progress or Progress()
    began = time.perf_counter() - progress.seconds
    meta = {"config": config.to_dict(), "overwrite": overwrite, "data": fingerprint(splits)}

    def save_checkpoint(p: Progress) -> None:
        p.seconds = time.perf_counter() - began
        write_checkpoint(checkpoint, p.tensors(model), meta | {"progress": p.to_json()})

    with _interruptible(checkpoint, out):
        if features:  # shallowest prefix first: deeper ones then start from its features, not from the images
            for frozen in sorted({s.frozen for s in plan[progress.stage:] if s.frozen > 0}):
                features.feed(splits, frozen)
        for stage in plan[progress.stage:]:
            feed = (features and features.feed(splits, stage.frozen)) or ImageFeed(splits, built.pre, config)
            fit(model, stage, feed, config, progress, save_checkpoint if checkpoint else None)
            best_epoch, history = progress.best_epoch, progress.history
            progress = Progress(progress.stage + 1, seconds=progress.seconds, history=history)
        seconds = time.perf_counter() - began
        _, _, probs = run_epoch(model, feed.val(), feed.start, config, desc="evaluating")
        result = metrics.evaluate(probs.numpy(), np.array(splits.val.labels), splits.classes)
        info = {
            "classes": splits.classes,
            "backbone": {"name": config.backbone, "blocks": built.block_names, **built.weights,
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
        run = Run(config, info, model.eval(), history, result, split, val_probabilities=probs.numpy())
        if out is not None:
            run.save(out, overwrite)
            checkpoint.unlink()
    return run


def resume(out: str | Path, store: FeatureCache | None = None) -> Run:
    """Continue an interrupted run from its last finished epoch; it ends as the uninterrupted run would have."""
    out = Path(out)
    path = checkpoint_path(out)
    if not path.is_file():
        done = (out / "config.json").is_file()
        raise TransferlabError(f"{out} finished training; there is nothing to resume" if done
                               else f"there is no interrupted run at {out} to resume")
    meta, tensors = read_checkpoint(path)
    config = TrainConfig.from_dict(meta["config"])
    splits = load_splits(config)
    if fingerprint(splits) != meta["data"]:
        raise TransferlabError(f"the images for {out} changed since it was interrupted, so it cannot continue as it "
                               "began; start again with --overwrite")
    return train(config, out, splits, store, meta["overwrite"], Progress.restore(meta["progress"], tensors))


def fingerprint(splits: Splits) -> str:
    """Which bytes are in which split, with which label: what a resumed run must find unchanged."""
    content = [(s.digests, s.labels) for s in (splits.train, splits.val)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


@contextlib.contextmanager
def _interruptible(checkpoint: Path | None, out: str | Path | None) -> Iterator[None]:
    """Ctrl-C, or SIGTERM (kill, a scheduler's time limit), stops training with an `Interrupted` that says
    whether and how the run can continue. Signal handlers can only be set from the main thread."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        yield
    except KeyboardInterrupt:
        if checkpoint is None:
            raise
        kept = (f"the finished epochs are saved: continue with `transferlab train --resume {out}`"
                if checkpoint.exists() else "no epoch had finished, so nothing was saved")
        raise Interrupted(f"interrupted; {kept}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
