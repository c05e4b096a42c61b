"""Run directories: everything needed to rebuild and use a model, written atomically, read without pickle.

    config.json        TrainConfig + what was derived from it (classes, blocks, preprocessing, weights, data)
    model.safetensors  the classifier's tensors
    history.csv        one row per epoch
    metrics.json       final validation metrics
    split.csv          which file was in which split, with its label

While training, RUN_DIR does not exist yet: the run's checkpoint is a hidden file beside it
(`.RUN_DIR.checkpoint.safetensors`), so a run killed at any moment never leaves a RUN_DIR that loads.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from . import data, devices, distributed, images, predictions
from .config import TrainConfig
from .devices import Device
from .errors import TransferlabError
from .feeds import Images
from .model import Classifier, create_classifier
from .predict import predict

FORMAT = "transferlab-run/1"
CHECKPOINT_FORMAT = "transferlab-checkpoint/1"


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling to write; renamed over `path` once complete, removed if writing fails. Readers
    see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, content: str | bytes) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)


def replace_dir(staging: Path, path: Path) -> None:
    """Put a completely written folder in place of `path`, whose old files all go: nothing stale stays behind."""
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


def checkpoint_path(run_dir: Path) -> Path:
    """Where an unfinished run keeps its checkpoint: beside RUN_DIR, hidden."""
    return run_dir.with_name(f".{run_dir.name}.checkpoint.safetensors")


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors plus JSON metadata in one safetensors file (no pickle), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta)})


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint written by `write_checkpoint`, or a one-line error."""
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if header.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a transferlab checkpoint")
            return json.loads(header["meta"]), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TransferlabError(f"cannot resume from {path} ({reason}); start again with --overwrite") from None


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def check_writable(path: Path, overwrite: bool) -> None:
    """Before any work: refuse to clobber an existing directory unless asked, never one that is not a
    transferlab run, and fail now, not after training, where `path` could not be written at all."""
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied and not (path / "config.json").is_file():
        raise TransferlabError(f"{path} exists and is not a transferlab run directory; choose another --out")
    if occupied and not overwrite:
        raise TransferlabError(f"{path} already exists; pass --overwrite to replace it")
    check_can_write(path)


def check_can_write(path: Path) -> None:
    """Fail now, not after the work, where `path` could not be created: a file in the way, no permission."""
    folder = path.parent
    while not folder.exists():  # the nearest folder that exists is where writing would start
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TransferlabError(f"cannot write {path}: {folder}: {e.strerror or e}") from None


def inference_device(config: TrainConfig) -> Device:
    """This machine's default device and switches for using a run: how it was trained sped up another machine."""
    return devices.resolve(dataclasses.replace(config, device="auto", amp=None, channels_last=None, fold_bn=None,
                                               gpu_decode=None, workers=None))


@dataclass
class Run:
    """A trained classifier and its record; `transferlab.load(path)` gives one back."""

    config: TrainConfig
    info: dict
    model: Classifier
    history: list[dict]
    metrics: dict
    split: list[dict]
    path: Path | None = None
    val_probabilities: np.ndarray | None = None  # right after training; not saved

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write every file into a fresh sibling folder, then swap it into place."""
        path = Path(path)
        check_writable(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.writing")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
            # bytes written by us, not save_file, which makes owner-only files whatever the umask
            (staging / "model.safetensors").write_bytes(save(state, metadata={"format": FORMAT}))
            (staging / "config.json").write_text(json.dumps(
                {"format": FORMAT, "config": self.config.to_dict(), **self.info}, indent=2))
            (staging / "history.csv").write_text(to_csv(self.history))
            (staging / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
            (staging / "split.csv").write_text(to_csv(self.split))
        except BaseException:  # a full disk or Ctrl-C: leave nothing half-written behind
            shutil.rmtree(staging)
            raise
        replace_dir(staging, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        if not path.exists() and checkpoint_path(path).is_file():
            raise TransferlabError(f"{path} did not finish training: continue it with "
                                   f"`transferlab train --resume {path}`")
        try:
            meta = json.loads((path / "config.json").read_text())
            if meta.get("format") != FORMAT:
                raise ValueError("not a transferlab run")
            config = TrainConfig.from_dict(meta["config"])
            info = {k: v for k, v in meta.items() if k not in ("format", "config")}
            state = load_file(str(path / "model.safetensors"))
            history = [{k: _number(v) for k, v in row.items()}
                       for row in csv.DictReader(io.StringIO((path / "history.csv").read_text()))]
            split = list(csv.DictReader(io.StringIO((path / "split.csv").read_text())))
            run_metrics = json.loads((path / "metrics.json").read_text())
            device = inference_device(config)
            model = create_classifier(config, len(info["classes"]), device.fold_bn,
                                      images.Preprocessing.from_dict(info["preprocessing"])).model
            model.load_state_dict(state)
        except TransferlabError:
            raise
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TransferlabError(f"{path} is not a readable transferlab run ({reason})") from None
        return cls(config, info, model.eval(), history, run_metrics, split, path)

    # -------------------------------------------------------------- use

    def probabilities(self, images: data.ImageSet) -> np.ndarray:
        """[images, classes] probabilities from the full model (decoded afresh, no cache), on this machine's
        default device; under torchrun each process predicts its share and every process gets them all."""
        from .memory import reuse_freed_memory

        reuse_freed_memory()
        device = inference_device(self.config)
        model = device.place(self.model)
        rows = distributed.share(len(images), self.config.seed)
        probs = predict(model, Images(images, self.preprocessing, self.config, device, keys=rows), device)
        return distributed.gather(torch.from_numpy(probs), len(images), self.config.seed).numpy()

    @property
    def preprocessing(self) -> images.Preprocessing:
        return images.Preprocessing.from_dict(self.info["preprocessing"])

    @property
    def card(self) -> dict:
        """What someone trying the model wants to know about it: the served page shows it, an export carries it."""
        validation = ("n_images", "accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
        return {"backbone": self.config.backbone, "weights": self.info["backbone"]["weights"],
                "strategy": self.config.strategy, "image_size": self.preprocessing.size, "classes": self.classes,
                "data": self.config.data, "validation": {k: self.metrics.get(k) for k in validation},
                "run": None if self.path is None else str(self.path.resolve())}

    def evaluate(self, folder: str | Path) -> dict:
        """Metrics on a labelled folder whose class names match the training classes."""
        from .metrics import evaluate as measure  # scikit-learn loads only for this

        images = data.scan(folder, classes=self.classes, max_pixels=self.config.max_pixels)
        if not len(images):
            raise TransferlabError(f"no usable images in {folder}")
        result = measure(self.probabilities(images), np.array(images.labels), self.classes)
        return result | {"skipped": [{"path": s.path, "reason": s.reason} for s in images.skipped]}

    def predict(self, paths: str | Path | Iterable[str | Path], top_k: int | None = None,
                errors: str = "row") -> list[dict]:
        """Label and probability per image, for one image or folder or several.

        Each row lists the `top_k` most likely classes (default 3, or 1 for a two-class model; at most every
        class). A file that cannot be used gets a row with its `error`, or with errors="raise" stops the call.
        """
        files, top_k = predictions.request(paths, top_k, self.classes, errors)
        unusable = {}
        for f in files:
            try:
                images.load_image(f, self.config.max_pixels)
            except images.BadImage as e:
                unusable[f] = str(e)
        good = [f for f in files if f not in unusable]
        run_model = good and not (errors == "raise" and unusable)  # a file to raise about stops it beforehand
        probs = self.probabilities(data.ImageSet(Path("."), self.classes, good, [0] * len(good))) if run_model else []
        return predictions.rows(files, unusable, probs, self.classes, top_k, errors)

    def __repr__(self) -> str:
        accuracy = self.metrics.get("accuracy")
        return (f"Run({self.config.backbone}, {self.config.strategy}, classes={self.classes}, "
                f"val_accuracy={accuracy:.4f}, path={str(self.path) if self.path else None!r})")

    def _repr_html_(self) -> str:
        """A card for Jupyter: what was trained, on what, and how well."""
        from html import escape

        m, counts = self.metrics, self.info["data"]["counts"]
        rows = [("backbone", f"{self.config.backbone} ({self.info['backbone']['weights']})"),
                ("strategy", self.config.strategy), ("classes", ", ".join(self.classes)),
                ("images", ", ".join(f"{split} {sum(c.values()):,}" for split, c in counts.items())),
                ("validation", f"accuracy {m['accuracy']:.4f}, f1 {m['f1']:.4f}, log loss {m['log_loss']:.4f}"),
                ("trained", f"{len(self.history)} epochs, best {self.info['best_epoch']}, "
                            f"{self.info['train_seconds']:.1f} s on {self.info.get('device', {}).get('name', '?')}"),
                ("path", str(self.path) if self.path else "not saved")]
        return "<table>" + "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>"
                                   f"{escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _number(value: str) -> int | float | str:
    """A history.csv cell as what it was: an int, a float, or text."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
