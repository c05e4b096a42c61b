"""How batches reach the model: decoded images, or cached frozen-prefix features.

Every feed yields (x, y) batches already on the run's device, entering the model at block `start` (0 for
images): the fit loop knows nothing about decoding, caching or devices. With the cache on, `start` is the
first trainable block, so frozen blocks run once per image (per augmented view) for the whole run instead of
once per image per epoch; with nothing frozen and no augmentation, the images themselves are decoded once.

Images are decoded in worker processes (persistent across epochs, pinned for the copy) or, on CUDA, read as
bytes by the workers and decoded on the GPU in batches (nvjpeg), then resized, cropped and augmented there;
files that are not plain JPEGs, or that the GPU decoder refuses, take the CPU path.

Under torchrun every pass is shared out (`distributed`): each process trains on its split of every epoch's
order, evaluates its share of the validation images, and computes features for its share of each cache file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from . import cache, distributed, weights
from .cache import FeatureCache
from .config import DEFAULT_MAX_PIXELS, TrainConfig
from .data import ImageSet, Preprocessing, load_image
from .devices import Device
from .model import Built
from .progress import bar, note
from .splits import Splits

Batch = tuple[torch.Tensor, torch.Tensor]


def transforms(pre: Preprocessing, augment: str = "none") -> v2.Compose:
    """PIL image or uint8 CHW tensor (on any device) -> uint8 CHW tensor at the backbone's size; augmentation
    (training only) after the crop.

    Normalisation is not here: the model owns its mean/std, so batches travel between processes as
    uint8 (4x less to copy) and an exported model cannot be fed wrongly normalised images.
    """
    interpolation = v2.InterpolationMode(pre.interpolation)
    steps = [v2.PILToTensor(), v2.Resize(pre.resize, interpolation, antialias=True), v2.CenterCrop(pre.size)]
    if augment in ("light", "standard"):
        steps.append(v2.RandomHorizontalFlip())
    if augment == "standard":  # what the Keras notebooks use: rotation 20 deg, zoom 10%, contrast 10%
        steps += [v2.RandomAffine(degrees=20, scale=(0.9, 1.1)),  # bilinear: tensors have no bicubic affine
                  v2.ColorJitter(contrast=0.1)]
    return v2.Compose(steps)


def is_plain_jpeg(path: Path) -> bool:
    """A JPEG in RGB or greyscale: what a GPU decoder turns into the same pixels as Pillow (CMYK and the rest
    go through Pillow's conversions)."""
    try:
        with Image.open(path) as im:
            return im.format == "JPEG" and im.mode in ("RGB", "L")
    except Exception:
        return False


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image tensor, label) pairs, keyed by index or (index, view).

    With augmentation, view v of image i is drawn with the RNG seeded by (seed, v, i): a training epoch's
    augmentation (view = epoch) is the same with or without worker processes, after a resume, on the GPU
    decoding path, and as a cached view.
    """

    def __init__(self, images: ImageSet, pre: Preprocessing, augment: str = "none",
                 max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0):
        self.images, self.pre, self.max_pixels = images, pre, max_pixels
        self.augment, self.transform, self.seed = augment, transforms(pre, augment), seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i = key[0] if isinstance(key, tuple) else key
        return self.finish(self.decode(i), key), self.images.labels[i]

    def decode(self, i: int) -> Image.Image:
        return load_image(self.images.files[i], self.max_pixels, draft=self.pre.resize)

    def finish(self, image: Image.Image | torch.Tensor, key: int | tuple[int, int]) -> torch.Tensor:
        """Resize, crop and (seeded) augment a decoded image."""
        if self.augment == "none":
            return self.transform(image)
        i, view = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, view, i)) & 0x7FFFFFFF)
            return self.transform(image)


class EncodedDataset(ImageDataset):
    """For decoding on the GPU: a plain JPEG's file bytes, left encoded; any other image decoded and finished
    here as `ImageDataset` does. Items are (payload, label, key, encoded)."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int | tuple[int, int], bool]:
        i = key[0] if isinstance(key, tuple) else key
        path = self.images.files[i]
        if is_plain_jpeg(path):
            return read_file(str(path)), self.images.labels[i], key, True
        return *super().__getitem__(key), key, False


class Feed(Protocol):
    """Training batches for an epoch and validation batches, entering the model at block `start`."""

    start: int

    def train(self, epoch: int) -> Iterable[Batch]: ...

    def val(self) -> Iterable[Batch]: ...


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of an epoch: the same with or without the cache, and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


class EpochKeys(Sampler):
    """(image, view) keys in the order of epoch `epoch` (this process's split of it), whose augmentation is view
    `epoch`. Set `epoch` and iterate the same loader again, so that its worker processes persist across epochs."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return len(distributed.split(list(range(self.n))))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in distributed.split(epoch_order(self.n, self.seed, self.epoch))])


class Images:
    """Batches of decoded uint8 images on the device, in the order of `keys` (default: as listed)."""

    def __init__(self, images: ImageSet, pre: Preprocessing, config: TrainConfig, device: Device,
                 augment: str = "none", keys: Sampler | Iterable | None = None, batch_size: int | None = None):
        kind = EncodedDataset if device.gpu_decode else ImageDataset
        self.dataset = kind(images, pre, augment, config.max_pixels, config.seed)
        self.device = device
        batch_size = batch_size or device.inference_batch
        workers = device.workers if len(images) > batch_size else 0  # one batch is not worth starting processes
        self.loader = DataLoader(
            self.dataset, batch_size=batch_size, sampler=keys,
            num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None, pin_memory=device.pin_memory,
            collate_fn=_as_list if device.gpu_decode else None,
            generator=torch.Generator().manual_seed(config.seed),  # its own: never shift the RNG dropout uses
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            x, y = self._decode(batch) if self.device.gpu_decode else batch
            yield self.device.put(x), y.to(self.device.device, non_blocking=True)

    def _decode(self, items: list) -> Batch:
        """Decode a batch's JPEGs on the GPU in one call and finish them there; the rest came decoded."""
        images = [payload if encoded else payload.to(self.device.device) for payload, _, _, encoded in items]
        jpegs = [k for k, (*_, encoded) in enumerate(items) if encoded]
        for k, image in zip(jpegs, decode_jpegs([images[k] for k in jpegs], self.device.device)):
            key = items[k][2]
            i = key[0] if isinstance(key, tuple) else key
            decoded = image if image is not None else self.dataset.decode(i)  # refused by the GPU: Pillow's
            images[k] = self.dataset.finish(decoded, key).to(self.device.device)
        return torch.stack(images), torch.tensor([label for _, label, *_ in items])


def _as_list(items: list) -> list:
    return items


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 images, upright, decoded on `device` in one call; None for any file the decoder refuses."""
    if not encoded:
        return []
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the whole batch: find it
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                decoded.append(None)
        return decoded


class ImageFeed:
    """Batches of images, augmented afresh every epoch; the whole model runs on them."""

    start = 0

    def __init__(self, splits: Splits, pre: Preprocessing, config: TrainConfig, device: Device):
        self.keys = EpochKeys(len(splits.train), config.seed)
        self.training = Images(splits.train, pre, config, device, config.augment, self.keys, config.batch_size)
        self.validation = Images(splits.val, pre, config, device, keys=distributed.share(len(splits.val), config.seed))

    def train(self, epoch: int) -> Iterable[Batch]:
        self.keys.epoch = epoch
        return self.training

    def val(self) -> Iterable[Batch]:
        return self.validation


class Batches:
    """Batches made as they are iterated, with their count known, so that a progress bar shows an ETA."""

    def __init__(self, batches: Iterable[Batch], count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


class CachedFeed:
    """Batches of cached block-`start` features (start 0: decoded images); epoch e draws augmented view e % views."""

    def __init__(self, start: int, views: list[np.ndarray], labels: list[int], val: np.ndarray,
                 val_labels: list[int], config: TrainConfig, device: Device):
        self.start, self.views, self.val_features = start, views, val
        self.labels, self.val_labels = torch.tensor(labels), torch.tensor(val_labels)
        self.config, self.device = config, device

    def _batches(self, features: np.ndarray, labels: torch.Tensor, order: list[int], size: int) -> Batches:
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        return Batches((self._batch(features[idx], labels[idx]) for idx in chunks), len(chunks))

    def _batch(self, features: np.ndarray, labels: torch.Tensor) -> Batch:
        x = self.device.put(torch.from_numpy(features))
        return x.float() if x.dtype == torch.float16 else x, labels.to(self.device.device)

    def train(self, epoch: int) -> Batches:
        order = distributed.split(epoch_order(len(self.labels), self.config.seed, epoch))
        return self._batches(self.views[epoch % len(self.views)], self.labels, order, self.config.batch_size)

    def val(self) -> Batches:
        order = distributed.share(len(self.val_labels), self.config.seed)
        return self._batches(self.val_features, self.val_labels, order, self.device.inference_batch)


class Features:
    """Frozen-prefix features of a run's images: from the FeatureCache, or computed now and stored there."""

    def __init__(self, built: Built, config: TrainConfig, device: Device, store: FeatureCache):
        self.built, self.config, self.device, self.store = built, config, device, store
        self.base = {"backbone": config.backbone, "weights": _weights_identity(config), "pre": asdict(built.pre),
                     "amp": device.amp, "decoder": "nvjpeg" if device.gpu_decode else "pillow",
                     "max_pixels": config.max_pixels}

    def get(self, images: ImageSet, block: int, augment: str = "none", view: int = 0) -> np.ndarray:
        """Features of blocks[:block] for `images` (augmented view `view`), computed only if not cached. A
        subset `within` a larger set (a learning curve's training sizes) reads that set's features, computed once
        for every subset."""
        if images.within:
            whole, indices = images.within
            return self.get(whole, block, augment, view)[list(indices)]
        identity = {**self.base, "augment": augment, "view": view,
                    "seed": self.config.seed if augment != "none" else None,
                    "files": [(str(p), *_stat(p)) for p in images.files]}
        if (hit := self.store.load(identity | {"block": block})) is not None:
            return hit
        rows = distributed.share(len(images), self.config.seed)  # under torchrun: this process's share
        # start from the deepest shallower prefix already cached (two-stage, compare), else from images
        start, batches, n = 0, None, self.device.inference_batch
        for j in range(block - 1, 0, -1):
            if (shallower := self.store.load(identity | {"block": j})) is not None:
                start, batches = j, ((self.device.put(torch.from_numpy(shallower[rows[i:i + n]])).float(), None)
                                     for i in range(0, len(rows), n))
                break
        if batches is None:
            keys = [(i, view) for i in rows] if augment != "none" else rows
            batches = Images(images, self.built.pre, self.config, self.device, augment, keys)
        model = self.built.model.eval()

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.device.autocast():
                return model.features(x, start, block).float().cpu()

        note(f"computing the frozen blocks' features of {len(images):,} images once (block {block}"
             + (f", augmented view {view}" if augment != "none" else "") + "); later epochs and runs read them")
        progress = bar(batches, f"caching block {block} features", total=-(-len(rows) // n))
        about = {"backbone": self.config.backbone, "dataset": str(images.root), "block": block, "augment": augment,
                 "view": view}
        return self.store.compute(identity | {"block": block}, progress, len(images), run_blocks, about,
                                  distributed.shares(len(images), self.config.seed))

    def feed(self, splits: Splits, block: int) -> CachedFeed | None:
        """Cached block-`block` features; with nothing frozen (block 0), the images themselves."""
        if block == 0:
            return self.images(splits)
        augment = self.config.augment
        views = range(self.config.cache_views if augment != "none" else 1)
        train = [self.get(splits.train, block, augment, v) for v in views]
        return CachedFeed(block, train, splits.train.labels, self.get(splits.val, block), splits.val.labels,
                          self.config, self.device)

    def images(self, splits: Splits) -> CachedFeed | None:
        """Unaugmented images are a pure function of their files too: decoded once and kept in RAM as uint8 for
        every epoch; None with augmentation or beyond the RAM budget (the images are then decoded each epoch)."""
        size = self.built.pre.size
        if self.config.augment != "none" or (len(splits.train) + len(splits.val)) * 3 * size**2 > self.store.ram_bytes:
            return None

        def decode(images: ImageSet) -> np.ndarray:
            batches = Images(images, self.built.pre, self.config, self.device)
            return torch.cat([x.cpu() for x, _ in bar(batches, "decoding images")]).numpy()

        return CachedFeed(0, [decode(splits.train)], splits.train.labels, decode(splits.val), splits.val.labels,
                          self.config, self.device)


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
