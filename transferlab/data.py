"""Image folders: scan and validate them, skip bad files with a reason, split.

Decoding itself is in `images` (NumPy and Pillow only). Nothing here writes to the user's folder: files are
only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from .config import DEFAULT_MAX_PIXELS
from .errors import TransferlabError
from .images import BadImage, Preprocessing, is_candidate, load_image
from .progress import note

NAMED_DATASETS = {
    "cats-vs-dogs": "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip",
}


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ImageSet:
    """Labelled image files under `root`; `files` are absolute, `skipped` paths relative to `root`."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]
    skipped: list[Skipped] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    within: tuple[ImageSet, tuple[int, ...]] | None = None  # a training subset: which images of which larger set

    def __len__(self) -> int:
        return len(self.files)

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(i) for i, c in enumerate(self.classes)}

    def subset(self, indices) -> ImageSet:
        return ImageSet(
            self.root,
            self.classes,
            [self.files[i] for i in indices],
            [self.labels[i] for i in indices],
            [],
            [self.digests[i] for i in indices] if self.digests else [],
        )

    def summary(self) -> dict:
        return {
            "classes": self.classes,
            "counts": self.counts(),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }


# ---------------------------------------------------------------- scanning


def _check(args: tuple[Path, int]) -> tuple[str | None, str]:
    """(reason or None, sha1 of the bytes) for one file; runs in a worker process."""
    path, max_pixels = args
    try:
        load_image(path, max_pixels)
    except BadImage as e:
        return str(e), ""
    return None, hashlib.sha1(path.read_bytes()).hexdigest()


def _map(fn, items: list, workers: int) -> list:
    if workers <= 1 or len(items) < 64:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, items, chunksize=32))


def scan(root: str | Path, classes: list[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
         workers: int | None = None, record: Path | None = None) -> ImageSet:
    """Find and validate every image under `root/<class>/**`.

    Classes are the sorted sub-folder names (or `classes`, to make a validation folder match training).
    Each file is fully decoded once, in parallel, so a broken file is skipped here with its reason rather than
    failing a training run halfway. With `record` (a JSON file), the verdicts are kept by file identity
    (path, size, mtime) and a later scan of the same folder decodes only new or changed files.
    """
    root = Path(os.path.abspath(root))  # absolute and normalised: runs stay usable from any directory
    if not root.is_dir():
        raise TransferlabError(f"data folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise TransferlabError(
            f"{root} has classes {found} but the training data has {classes}"
        )
    if len(classes) < 2:
        raise TransferlabError(f"{root} needs at least two class sub-folders of images, found {found or 'none'}")
    candidates: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        for dirpath, dirnames, filenames in os.walk(folder) if folder.is_dir() else []:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            candidates += [(Path(dirpath) / f, label) for f in sorted(filenames) if is_candidate(Path(f))]
    known = _read_record(record, max_pixels)
    identities = [_identity(p) for p, _ in candidates]
    todo = [k for k, (p, _) in enumerate(candidates) if known.get(str(p), [None])[:2] != identities[k]]
    note(f"scanning {len(candidates):,} files in {root}" + (f" ({len(candidates) - len(todo):,} known from an "
                                                             "earlier scan)" if len(todo) < len(candidates) else ""))
    checked = dict(zip(todo, _map(_check, [(candidates[k][0], max_pixels) for k in todo],
                                  workers or os.cpu_count() or 1)))
    images = ImageSet(root, list(classes), [], [])
    verdicts = {}
    for k, (path, label) in enumerate(candidates):
        reason, digest = checked[k] if k in checked else known[str(path)][2:]
        verdicts[str(path)] = [*identities[k], reason, digest]
        if reason:
            images.skipped.append(Skipped(str(path.relative_to(root)), reason))
        else:
            images.files.append(path)
            images.labels.append(label)
            images.digests.append(digest)
    if record is not None and todo:
        _write_record(record, max_pixels, verdicts)
    return images


def _identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_record(record: Path | None, max_pixels: int) -> dict[str, list]:
    """path -> [size, mtime_ns, reason, digest] from an earlier scan with the same limit; {} if none."""
    try:
        saved = json.loads(record.read_text()) if record else {}
    except (OSError, ValueError):
        return {}
    return saved.get("files", {}) if saved.get("max_pixels") == max_pixels else {}


def _write_record(record: Path, max_pixels: int, verdicts: dict[str, list]) -> None:
    """Best effort and atomic: a scan record only saves time, so failing to write one is no error."""
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"max_pixels": max_pixels, "files": verdicts}))
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)


def require_trainable(images: ImageSet, what: str = "training data") -> None:
    empty = [c for c, n in images.counts().items() if n == 0]
    if empty:
        raise TransferlabError(f"{what} in {images.root} has no usable images for class(es): {', '.join(empty)}")


def split(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Stratified, seeded train/validation split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(images))
    try:
        train_idx, val_idx = train_test_split(
            indices, test_size=fraction, random_state=seed, stratify=images.labels
        )
    except ValueError as e:
        raise TransferlabError(f"cannot split {images.root} for validation: {e}") from None
    return images.subset(sorted(train_idx)), images.subset(sorted(val_idx))


def duplicates(named: dict[str, ImageSet]) -> list[dict]:
    """Byte-identical images that appear in more than one split (leakage that inflates validation scores)."""
    seen: dict[str, tuple[str, Path]] = {}
    found = []
    for split_name, images in named.items():
        for path, digest in zip(images.files, images.digests):
            if digest in seen and seen[digest][0] != split_name:
                found.append({"a": f"{seen[digest][0]}:{seen[digest][1]}", "b": f"{split_name}:{path}"})
            seen.setdefault(digest, (split_name, path))
    return found


# ---------------------------------------------------------------- named datasets


def data_dir() -> Path:
    """Where named datasets live: $TRANSFERLAB_DATA, else ~/.cache/transferlab/data."""
    return Path(os.environ.get("TRANSFERLAB_DATA", Path.home() / ".cache" / "transferlab" / "data"))


@dataclass(frozen=True)
class Layout:
    """Where a dataset's images are: `train`, and its `val` and `test` folders when it has them."""

    train: Path
    val: Path | None = None
    test: Path | None = None

    @property
    def splits(self) -> dict[str, Path]:
        return {name: path for name, path in (("train", self.train), ("validation", self.val), ("test", self.test))
                if path is not None}


VALIDATION_NAMES = ("validation", "val", "valid")


def split_layout(root: Path) -> Layout | None:
    """A dataset root holding `train/` and `validation/` (or `val/`, `valid/`), perhaps `test/`: its splits;
    None for a plain folder of class sub-folders."""
    val = next((root / name for name in VALIDATION_NAMES if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or val is None:
        return None
    return Layout(root / "train", val, root / "test" if (root / "test").is_dir() else None)


def resolve(data: str | Path) -> Layout:
    """A folder of class sub-folders, a dataset root with split folders, or a dataset name -> its layout."""
    if str(data) in NAMED_DATASETS and not Path(data).exists():
        base = data_dir() / str(data)
        if not (base / "train").is_dir():
            raise TransferlabError(
                f"dataset {data!r} is not in {data_dir()}: run `transferlab data download {data}` "
                "or set TRANSFERLAB_DATA to the folder that holds it"
            )
        return split_layout(base) or Layout(base / "train")
    return split_layout(Path(data)) or Layout(Path(data))


def download(name: str) -> Path:
    """Fetch a named dataset into the data dir (needs the network). Nothing is left behind if it fails."""
    import tempfile

    if name not in NAMED_DATASETS:
        raise TransferlabError(f"unknown dataset {name!r}; known: {', '.join(NAMED_DATASETS)}")
    target = data_dir() / name
    if (target / "train").is_dir():
        return target
    url = NAMED_DATASETS[name]
    with tempfile.TemporaryDirectory(prefix="transferlab-download-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:
            raise TransferlabError(
                f"could not download {name} from {url} ({e.__class__.__name__}): connect to the internet, "
                f"or put the images in {target}/{{train,validation}}/<class>/"
            ) from None
        with zipfile.ZipFile(archive) as z:  # extractall keeps every member inside `tmp`
            z.extractall(Path(tmp) / "unpacked")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(next(p for p in (Path(tmp) / "unpacked").rglob("train") if p.is_dir()).parent, target)
    return target
