"""Configurations side by side: every point of a comparison trains on the same split, preprocessing and feature
cache, so two rows differ only in what a study varies (the strategy and its depth, the training images, the seed).

    OUT/<point>/                  a normal run directory per point (`transferlab evaluate/predict` work on it)
    OUT/comparison.json           what was asked, the set-up, every point's numbers, and the study's analysis
    OUT/comparison.csv            one flat row per point
    OUT/predictions/<point>.npz   validation (and test) probabilities, for paired tests and the report
    OUT/report.html, report.md, plots/   see `report`

OUT appears only when the comparison is complete: until then everything is written to a hidden sibling,
`.OUT.comparing`, which `compare --resume OUT` continues and which then replaces an older comparison whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from . import backbones, distributed, metrics
from .config import TrainConfig
from .images import Preprocessing
from .devices import Device
from .errors import TransferlabError
from .feeds import Features
from .model import Built
from .predict import predict
from .runs import Run, check_can_write, checkpoint_path, replace_dir, to_csv, write_atomic
from .splits import Splits
from .strategies import Stage, stages
from .training import resume, train

FORMAT = "transferlab-comparison/1"
REPORT_FILES = {"comparison.json", "comparison.csv", "report.html", "report.md", "plots", "predictions"}
TOP_K = (2, 3, 5)  # top-k accuracy for every k below the number of classes


@dataclass(frozen=True)
class Sweep:
    """What a comparison varies. Depths and sizes are labels as the user gave them: depths "0".."N" or "all";
    sizes images per class ("100"), a fraction of each class ("0.25") or "all"."""

    strategies: tuple[str, ...]
    depths: tuple[str, ...] = ()  # () = each strategy at the config's --unfreeze-blocks
    sizes: tuple[str, ...] = ("all",)
    seeds: tuple[int, ...] = ()  # () = the config's seed alone

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sweep:
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class Point:
    """One configuration to train: a strategy at a depth, on a training subset, with a seed."""

    name: str  # its run directory and its row's label, e.g. partial-2 or partial-2_n100_seed1
    configuration: str  # the strategy at its depth: feature-extraction, partial-2, two-stage-all, full
    config: TrainConfig
    train_size: str = "all"


@dataclass
class Scores:
    """A model's numbers on one set of images."""

    accuracy: float
    loss: float
    f1: float
    roc_auc: float | None
    top_k: dict[int, float]  # k -> the share of images whose class is among the k most probable
    confusion: list[list[int]]  # rows: true class, columns: predicted

    @classmethod
    def of(cls, probs: np.ndarray, labels: Sequence[int], classes: list[str]) -> Scores:
        labels = np.asarray(labels)
        m = metrics.evaluate(probs, labels, classes)
        top_k = {k: float(skm.top_k_accuracy_score(labels, probs, k=k, labels=range(len(classes))))
                 for k in TOP_K if k < len(classes)}
        return cls(m["accuracy"], m["log_loss"], m["f1"], m["roc_auc"], top_k, m["confusion_matrix"])

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        return cls(**d | {"top_k": {int(k): v for k, v in d["top_k"].items()}})


@dataclass
class Row:
    """One trained point: what it was, what it scored, what it cost."""

    name: str
    configuration: str
    strategy: str
    train_size: str
    train_images: int
    seed: int
    blocks_trained: int  # in its last stage
    trainable_params: int
    total_params: int
    best_epoch: int
    epochs_run: int
    train_accuracy: float  # running accuracy of the best epoch: dropout and augmentation were on
    val: Scores
    test: Scores | None
    train_seconds: float  # as measured here, including any frozen-prefix features this point computed
    fit_seconds: float  # the epochs alone: what the point costs once the one-off feature pass is done
    features_computed: int  # feature arrays this point computed (others read them from the cache)
    weights: str
    stages: list[Stage]
    history: list[dict]
    val_probs: np.ndarray = field(repr=False, compare=False)
    test_probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """comparison.json's entry: everything but the probabilities (those are in predictions/)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("val_probs", "test_probs")}

    @classmethod
    def from_dict(cls, d: dict, val_probs: np.ndarray, test_probs: np.ndarray | None) -> Row:
        return cls(**d | {"val": Scores.from_dict(d["val"]),
                          "test": d["test"] and Scores.from_dict(d["test"]),
                          "stages": [Stage(**s) for s in d["stages"]]}, val_probs=val_probs, test_probs=test_probs)

    def flat(self) -> dict:
        """The columns of comparison.csv and of the terminal table (test and top-k only where they exist)."""
        def scores(prefix: str, s: Scores) -> dict:
            return {f"{prefix}_accuracy": s.accuracy, f"{prefix}_loss": s.loss, f"{prefix}_f1": s.f1,
                    f"{prefix}_roc_auc": s.roc_auc} | {f"{prefix}_top{k}": v for k, v in s.top_k.items()}

        return ({k: getattr(self, k) for k in ("name", "configuration", "strategy", "train_size", "train_images",
                                                "seed", "blocks_trained", "trainable_params", "total_params",
                                                "best_epoch", "epochs_run", "train_accuracy")}
                | scores("val", self.val) | (scores("test", self.test) if self.test else {})
                | {"train_seconds": self.train_seconds, "fit_seconds": self.fit_seconds,
                   "features_computed": self.features_computed})

    def correct(self, labels: Sequence[int], split: str = "val") -> np.ndarray:
        """Per image of `split` (val or test): whether this model's most probable class is the true one."""
        probs = self.val_probs if split == "val" else self.test_probs
        return probs.argmax(1) == np.asarray(labels)


@dataclass
class Failure:
    """A point that could not be trained: recorded, and the sweep goes on."""

    name: str
    configuration: str
    train_size: str
    seed: int
    error: str


@dataclass
class Comparison:
    """Every point's numbers, on one split; `rows` in the order the sweep lists its points."""

    config: TrainConfig  # shared settings; each point's own differs in strategy, depth and seed
    sweep: Sweep
    splits: Splits
    blocks: list[str]  # the backbone's block names
    device: dict  # the device and its switches, as every run used them
    rows: list[Row]
    failures: list[Failure]
    out: Path
    _runs: dict[str, Run] = field(default_factory=dict, repr=False)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.run(self.rows[0].name).preprocessing

    def run(self, name: str) -> Run:
        """A point's trained run, loaded from its run directory when first asked for."""
        if name not in self._runs:
            self._runs[name] = Run.load(self.out / name)
        return self._runs[name]

    @property
    def best(self) -> Row:
        """Highest validation accuracy; lower validation loss breaks ties."""
        return max(self.rows, key=lambda r: (r.val.accuracy, -r.val.loss))

    @property
    def features_computed(self) -> int:
        return sum(r.features_computed for r in self.rows)

    def document(self) -> dict:
        """comparison.json without the analysis (which `studies` adds)."""
        shared = {k: v for k, v in self.config.to_dict().items() if k != "strategy"}
        return {"format": FORMAT, "backbone": self.config.backbone, "config": shared, "sweep": self.sweep.to_dict(),
                "data": self.splits.summary(),
                "blocks": self.blocks, "device": self.device,
                "best": self.best.name if self.rows else None, "features_computed": self.features_computed,
                "points": [r.to_dict() for r in self.rows], "failures": [asdict(f) for f in self.failures]}


def _plain(value):
    """JSON-able: dataclasses (stages, scores) as dicts."""
    if dataclasses.is_dataclass(value):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- training the points


def training_order(points: Sequence[Point]) -> list[Point]:
    """Points that cache a shallower frozen prefix train first, so that deeper prefixes are computed from their
    cached features instead of from the images: feature extraction after partial fine-tuning runs one block per
    image, not the whole backbone. Points with nothing frozen (full, scratch) train last."""
    n = len(backbones.block_names(points[0].config.backbone))

    def shallowest_prefix(point: Point) -> int:
        cfg = point.config
        plan = stages(cfg.strategy, n, cfg.unfreeze_blocks, cfg.epochs, cfg.head_epochs)
        return min((s.frozen for s in plan if s.frozen), default=n + 1)

    return sorted(points, key=shallowest_prefix)


def train_point(point: Point, splits: Splits, folder: Path, store, device: Device) -> Row:
    """Train one point into `folder/<name>` (continuing its checkpoint if an interrupted comparison left one) and
    score it on validation and, if given, test images."""
    run_dir = folder / point.name
    misses = store.misses
    if checkpoint_path(run_dir).is_file():
        run = resume(run_dir, store, splits, device)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # finished but never recorded: train it again, identically
        run = train(point.config, run_dir, splits=splits, store=store, device=device)
    test_probs = _test_probabilities(run, splits, store, device) if splits.test else None
    info, history = run.info, run.history
    return Row(
        name=point.name, configuration=point.configuration, strategy=point.config.strategy,
        train_size=point.train_size, train_images=len(splits.train), seed=point.config.seed,
        blocks_trained=len(info["backbone"]["blocks"]) - info["stages"][-1]["frozen"],
        trainable_params=info["trainable_params"], total_params=info["total_params"],
        best_epoch=info["best_epoch"], epochs_run=len(history),
        train_accuracy=history[info["best_epoch"] - 1]["train_accuracy"],
        val=Scores.of(run.val_probabilities, splits.val.labels, splits.classes),
        test=None if test_probs is None else Scores.of(test_probs, splits.test.labels, splits.classes),
        train_seconds=info["train_seconds"], fit_seconds=sum(h["seconds"] for h in history),
        features_computed=store.misses - misses, weights=info["backbone"]["weights"],
        stages=[Stage(**s) for s in info["stages"]], history=history,
        val_probs=run.val_probabilities, test_probs=test_probs,
    )


def _test_probabilities(run: Run, splits: Splits, store, device: Device) -> np.ndarray:
    """Test images scored as the validation images were: through the cached frozen prefix when there is one."""
    frozen = run.info["stages"][-1]["frozen"]
    if not (run.config.cache and frozen):
        return run.probabilities(splits.test)
    backbone = run.info["backbone"]
    built = Built(run.model, run.preprocessing, backbone["blocks"], backbone["feature_shape"],
                  {k: v for k, v in backbone.items() if k.startswith("weights")})
    features = Features(built, run.config, device, store).get(splits.test, frozen)
    n = device.inference_batch
    batches = ((device.put(torch.from_numpy(np.asarray(features[i:i + n]))).float(),) for i in range(0, len(features), n))
    return predict(run.model, batches, device, start=frozen, desc="testing")


# ---------------------------------------------------------------- the comparison folder


class Folder:
    """Where a comparison is written while it runs (a hidden sibling of OUT), and how it then replaces OUT."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        resolved = self.out.resolve()  # `--out .` has no name of its own
        self.staging = resolved.with_name(f".{resolved.name}.comparing")

    @distributed.main_only  # under torchrun the others find its refusal as the main process ending
    def begin(self, overwrite: bool) -> None:
        """Refuse what must not be replaced, before any work; then start an empty staging folder."""
        check_replaceable(self.out, overwrite)
        check_can_write(self.out)
        if self.staging.exists():
            if not overwrite:
                raise TransferlabError(f"{self.out} has an interrupted comparison: continue it with "
                                       f"`transferlab compare --resume {self.out}` or pass --overwrite to start again")
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def interrupted(self) -> dict:
        """The record of the interrupted comparison to continue, or a one-line error saying why there is none."""
        record = self.staging / "comparison.json"
        if not record.is_file():
            done = (self.out / "comparison.json").is_file()
            raise TransferlabError(f"{self.out} finished comparing; there is nothing to resume" if done
                                   else f"there is no interrupted comparison at {self.out} to resume")
        try:
            doc = json.loads(record.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError("not a transferlab comparison")
            return doc
        except (ValueError, OSError) as e:
            raise TransferlabError(f"cannot resume from {self.staging} ({e}); start again with --overwrite") from None

    @distributed.main_only
    def save(self, doc: dict, row: Row | None = None) -> None:
        """Record progress: the document, and the probabilities of the point just finished."""
        if row is not None:
            (self.staging / "predictions").mkdir(exist_ok=True)
            arrays = {"val": row.val_probs} | ({"test": row.test_probs} if row.test_probs is not None else {})
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_atomic(self.staging / "predictions" / f"{row.name}.npz", buffer.getvalue())
        write_atomic(self.staging / "comparison.json", json.dumps(doc, indent=2))

    def rows(self, doc: dict) -> list[Row]:
        """The points the interrupted comparison finished, with their probabilities."""
        def row(d: dict) -> Row:
            with np.load(self.staging / "predictions" / f"{d['name']}.npz", allow_pickle=False) as arrays:
                return Row.from_dict(d, arrays["val"], arrays["test"] if "test" in arrays else None)

        return [row(d) for d in doc["points"]]

    @distributed.main_only
    def write(self, name: str, content: str | bytes) -> None:
        write_atomic(self.staging / name, content)

    @distributed.main_only
    def commit(self) -> None:
        """The finished comparison replaces OUT whole: no file of an older one stays."""
        replace_dir(self.staging, self.out.resolve())


def check_replaceable(out: Path, overwrite: bool) -> None:
    """An empty or missing OUT is fine; an earlier comparison only with --overwrite; anything else never."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    foreign = _foreign(out)
    if foreign:
        raise TransferlabError(f"{out} is not a comparison written by transferlab compare (it holds {foreign}); "
                               "refusing to replace it: choose another --out")
    if not overwrite:
        raise TransferlabError(f"{out} already exists; pass --overwrite to replace it")


def _foreign(out: Path) -> str:
    """What in `out` a comparison did not write ('' if nothing): a photo folder, a stray file, a non-folder."""
    if not out.is_dir():
        return "a file, not a folder"
    try:
        doc = json.loads((out / "comparison.json").read_text())
        points = ([p["name"] for p in doc["points"] + doc["failures"]] if doc.get("format") == FORMAT
                  else [s["strategy"] for s in doc["strategies"]])  # written before the format was named
        ours = REPORT_FILES | set(points)
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    return ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")


def format_table(rows: list[list[str]]) -> str:
    """A table for a terminal: the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def to_csv_rows(rows: list[Row]) -> str:
    """comparison.csv: every point's flat columns (a column missing from some rows is left empty)."""
    flat = [r.flat() for r in rows]
    columns = list(dict.fromkeys(k for f in flat for k in f))
    return to_csv([{k: f.get(k) for k in columns} for f in flat])
