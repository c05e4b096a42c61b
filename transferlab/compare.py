"""Strategies side by side: every strategy trains on the same split, seed, preprocessing, augmentation and
feature cache, so the only difference between two rows is which blocks trained and how.

    OUT/<strategy>/      a normal run directory per strategy (`transferlab evaluate/predict` work on it)
    OUT/comparison.json  set-up, and per strategy its numbers, stages and per-epoch history
    OUT/comparison.csv   the flat columns
    OUT/report.html, report.md, plots/   see `report`
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backbones, devices, metrics
from .config import TrainConfig
from .data import Preprocessing
from .errors import TransferlabError
from .feeds import feature_store
from .progress import note
from .runs import Run, check_writable, to_csv, write_atomic
from .splits import Splits, load_splits
from .strategies import STRATEGIES, stages
from .training import train

# (key, header, format): the flat columns, in the order of the CSV, the terminal table and the reports
COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("trainable_params", "trainable", "{:,}"),
    ("total_params", "total", "{:,}"),
    ("blocks_trained", "blocks", "{}"),
    ("best_epoch", "best ep", "{}"),
    ("epochs_run", "epochs", "{}"),
    ("train_accuracy", "train acc", "{:.4f}"),
    ("val_accuracy", "val acc", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_f1", "val f1", "{:.4f}"),
    ("val_roc_auc", "val auc", "{:.4f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_f1", "test f1", "{:.4f}"),
    ("test_roc_auc", "test auc", "{:.4f}"),
    ("train_seconds", "seconds", "{:.1f}"),
]


@dataclass
class Comparison:
    """The trained runs with their numbers; `rows` are comparison.json's entries, in the order asked for."""

    config: TrainConfig  # shared settings; each run's own config differs only in `strategy`
    splits: Splits
    runs: dict[str, Run]
    val_probs: dict[str, np.ndarray]  # [val images, classes] of each restored best model
    rows: list[dict]
    out: Path

    @property
    def blocks(self) -> list[str]:
        """The backbone's block names (the same for every strategy)."""
        return next(iter(self.runs.values())).info["backbone"]["blocks"]

    @property
    def preprocessing(self) -> Preprocessing:
        return next(iter(self.runs.values())).preprocessing

    @property
    def best(self) -> dict:
        """Highest validation accuracy; lower validation loss breaks ties."""
        return max(self.rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))


def run_comparison(config: TrainConfig, strategies: str | Sequence[str], out: str | Path, test: str | None = None,
                   overwrite: bool = False) -> Comparison:
    """Train each strategy on the same data and write their runs and comparison.json/csv to `out` (the report
    is `report.write`'s)."""
    out = Path(out)
    configs = _configs(config, strategies)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TransferlabError(f"{out} already exists; pass --overwrite to replace it")
    for name in configs:  # fail now, not after an hour of training
        check_writable(out / name, overwrite)
    device = devices.resolve(config)
    order = training_order(configs)  # a wrong backbone name fails here, before any image is scanned
    splits = load_splits(config, test)
    store = feature_store(config)
    runs, val_probs, entries = {}, {}, []
    for i, name in enumerate(order, 1):
        cfg = configs[name]
        note(f"== {name} ({i}/{len(configs)}) ==")
        misses = store.misses
        runs[name] = run = train(cfg, out / name, splits=splits, store=store, overwrite=overwrite, device=device)
        val_probs[name] = run.val_probabilities  # what its metrics came from; no second pass
        test_probs = run.probabilities(splits.test) if splits.test else None
        entries.append(_entry(name, run, splits, val_probs[name], test_probs) | {
            "features_computed": store.misses - misses})
    entries.sort(key=lambda row: list(configs).index(row["strategy"]))  # rows in the order asked for
    comparison = Comparison(config, splits, {name: runs[name] for name in configs}, val_probs, entries, out)
    _write(comparison)
    return comparison


def _configs(config: TrainConfig, strategies: str | Sequence[str]) -> dict[str, TrainConfig]:
    if isinstance(strategies, str):  # "partial,full" or one name, never its characters
        strategies = [s.strip() for s in strategies.split(",")]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise TransferlabError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if not strategies or len(set(strategies)) != len(strategies):
        raise TransferlabError(f"name each strategy to compare once, got {', '.join(strategies) or 'none'}")
    return {s: dataclasses.replace(config, strategy=s) for s in strategies}


def training_order(configs: dict[str, TrainConfig]) -> list[str]:
    """Strategies that cache a shallower frozen prefix train first, so that deeper prefixes are computed from
    their cached features instead of from the images: feature extraction after partial fine-tuning runs one
    block per image, not the whole backbone. Strategies with nothing frozen (full, scratch) train last."""
    config = next(iter(configs.values()))
    n = len(backbones.block_names(config.backbone))

    def shallowest_prefix(cfg: TrainConfig) -> int:
        plan = stages(cfg.strategy, n, cfg.unfreeze_blocks, cfg.epochs, cfg.head_epochs)
        return min((s.frozen for s in plan if s.frozen), default=n + 1)

    return sorted(configs, key=lambda name: shallowest_prefix(configs[name]))


def _entry(name: str, run: Run, splits: Splits, val_probs: np.ndarray, test_probs: np.ndarray | None) -> dict:
    """Flat columns first, then what the report needs: stages, trained blocks, history."""
    info, classes = run.info, splits.classes
    val = metrics.evaluate(val_probs, np.array(splits.val.labels), classes)
    blocks = info["backbone"]["blocks"]
    last = info["stages"][-1]
    row = {
        "strategy": name,
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "blocks_trained": len(blocks) - last["frozen"],
        "best_epoch": info["best_epoch"],
        "epochs_run": len(run.history),
        # running accuracy of the best epoch: train mode, so dropout and augmentation were on
        "train_accuracy": run.history[info["best_epoch"] - 1]["train_accuracy"],
        "val_accuracy": val["accuracy"],
        "val_loss": val["log_loss"],
        "val_f1": val["f1"],
        "val_roc_auc": val["roc_auc"],
    }
    if test_probs is not None:
        t = metrics.evaluate(test_probs, np.array(splits.test.labels), classes)
        row |= {"test_accuracy": t["accuracy"], "test_f1": t["f1"], "test_roc_auc": t["roc_auc"]}
    return row | {
        "train_seconds": info["train_seconds"],
        "run_dir": str(run.path),
        "weights": info["backbone"]["weights"],
        "val_confusion_matrix": val["confusion_matrix"],
        "stages": [s | {"trained_blocks": blocks[s["frozen"]:]} for s in info["stages"]],
        "history": run.history,
    }


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The COLUMNS present in `rows` (test_* only when a test set was given)."""
    return [c for c in COLUMNS if c[0] in rows[0]]


def flat(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k, _, _ in _columns(rows)} for r in rows]


def table(rows: list[dict]) -> list[list[str]]:
    """Header and formatted cells of the flat columns; a missing number (no ROC AUC) shows as '-'."""
    columns = _columns(rows)
    return [[header for _, header, _ in columns]] + [
        ["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in columns] for r in rows]


def format_table(rows: list[dict]) -> str:
    """The table for a terminal: strategy left-aligned, numbers right-aligned."""
    cells = table(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _write(c: Comparison) -> None:
    c.out.mkdir(parents=True, exist_ok=True)
    shared = {k: v for k, v in c.config.to_dict().items() if k != "strategy"}
    doc = {"backbone": c.config.backbone, "config": shared, "data": c.splits.summary(),
           "best": c.best["strategy"], "strategies": c.rows}
    write_atomic(c.out / "comparison.json", json.dumps(doc, indent=2))
    write_atomic(c.out / "comparison.csv", to_csv(flat(c.rows)))
