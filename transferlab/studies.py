"""What fine-tuning buys on this data, answered with numbers that say how sure they are.

A study sweeps strategies and their depth (blocks trained), training-set size and seed. Each combination is one
point, trained by `compare` on the same split and the same feature store: a deeper frozen prefix is computed from a
shallower one, and every training subset reads the features of the whole training split. Failed points are
recorded and the sweep goes on.

The statistics, all on the same images for every point:
- a 95% Wilson interval on an accuracy (the mean over seeds, as a count of the images);
- paired tests between two configurations: the exact sign test on the images where one is right (more often,
  over seeds) than the other. With one seed this is the exact McNemar test;
- the recommendation: the cheapest configuration whose validation accuracy is not significantly below the best
  one's, with its accuracy (test if given, else validation) and what the costlier ones buy;
- the learning curve's verdict: from which training size on fine-tuning beat feature extraction beyond noise.
Decisions are made on the validation images (the ones the models were selected on); test images, when given, give
the estimate of how the recommended configuration does on new images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from . import backbones, devices, distributed
from .comparison import (Comparison, Failure, Folder, Point, Row, Sweep, to_csv_rows, train_point, training_order)
from .config import TrainConfig
from .data import ImageSet
from .errors import TransferlabError
from .feeds import feature_store
from .progress import note
from .splits import load_splits
from .strategies import STRATEGIES
from .training import Interrupted, sigterm_interrupts

ALPHA = 0.05  # the significance level of every verdict
DEPTH_STRATEGIES = ("partial", "two-stage")  # the strategies that --unfreeze-blocks applies to
SWEEP_OPTIONS = ("strategies", "unfreeze_blocks", "train_sizes", "seeds")

# ---------------------------------------------------------------- what to train


def sweep(strategies: Sequence[str] | str | None = None, unfreeze_blocks=None, train_sizes=None,
          seeds=None) -> Sweep:
    """A Sweep from the user's lists (sequences or comma-separated strings); None leaves that axis alone."""
    depths = _labels(unfreeze_blocks, "--unfreeze-blocks")
    names = _labels(strategies, "--strategies") or (["partial"] if depths else [])
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise TransferlabError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if not names:
        raise TransferlabError("say what to compare: --strategies (e.g. feature-extraction,partial,full) or "
                               "--unfreeze-blocks (e.g. 0,1,2,all)")
    if len(set(names)) != len(names):
        raise TransferlabError(f"name each strategy to compare once, got {', '.join(names)}")
    if depths and not set(names) & set(DEPTH_STRATEGIES):
        raise TransferlabError("--unfreeze-blocks applies to partial and two-stage: add one to --strategies")
    return Sweep(tuple(names), _depths(depths), _sizes(_labels(train_sizes, "--train-sizes")),
                 _seeds(_labels(seeds, "--seeds")))


def _labels(values, flag: str) -> list[str]:
    if values is None:
        return []
    items = values.split(",") if isinstance(values, str) else list(values) if isinstance(values, Sequence) else [values]
    labels = ["all" if v is None else str(v).strip() for v in items]
    if "" in labels:
        raise TransferlabError(f"{flag} has an empty entry: {values!r}")
    return labels


def _depths(labels: list[str]) -> tuple[str, ...]:
    for d in labels:
        if d != "all" and not (d.isdigit()):
            raise TransferlabError(f"--unfreeze-blocks takes block counts (0 = feature extraction) or 'all', got {d!r}")
    order = sorted(set(labels), key=lambda d: float("inf") if d == "all" else int(d))
    return tuple(str(int(d)) if d != "all" else d for d in order)


def _sizes(labels: list[str]) -> tuple[str, ...]:
    """Images per class (integers) or fractions of each class, ascending; 'all' last."""
    sizes = []
    for s in labels:
        try:
            value = None if s == "all" else float(s)
        except ValueError:
            value = -1.0
        if value is not None and not (value >= 1 and value.is_integer() or 0 < value < 1):
            raise TransferlabError(f"--train-sizes takes images per class (50), fractions (0.25) or 'all', got {s!r}")
        sizes.append(value)
    numbers = [v for v in sizes if v is not None]
    if any(v < 1 for v in numbers) and any(v >= 1 for v in numbers):
        raise TransferlabError("give --train-sizes as images per class or as fractions, not both")
    labels = [f"{v:g}" if v < 1 else str(int(v)) for v in sorted(set(numbers))]
    return tuple(labels + ["all"] if None in sizes or not sizes else labels)


def _seeds(labels: list[str]) -> tuple[int, ...]:
    if not all(s.isdigit() for s in labels) or len(set(labels)) != len(labels):
        raise TransferlabError(f"--seeds takes distinct whole numbers, got {','.join(labels)}")
    return tuple(int(s) for s in labels)


def plan(config: TrainConfig, sweep: Sweep) -> list[Point]:
    """One point per configuration (strategy at a depth) x training size x seed, in that order. Depth 0 is
    feature extraction and partial at all blocks is full fine-tuning; names carry only the axes that vary."""
    n = len(backbones.block_names(config.backbone))  # a wrong backbone name fails here, before any image is read
    configurations: dict[str, tuple[str, int | None]] = {}
    for strategy in sweep.strategies:
        for depth in (sweep.depths if strategy in DEPTH_STRATEGIES and sweep.depths else [None]):
            if depth is not None and depth != "all" and int(depth) > n:
                raise TransferlabError(f"--unfreeze-blocks {depth}: {config.backbone} has {n} blocks; give 0 to {n} "
                                       "or all")
            unfreeze = config.unfreeze_blocks if depth in (None, "0") else None if depth in ("all", str(n)) else int(depth)
            if depth == "0":
                name, strategy_at = "feature-extraction", "feature-extraction"
            elif strategy == "partial" and unfreeze is None:
                name, strategy_at = "full", "full"
            else:
                name = strategy if len(sweep.depths) < 2 else f"{strategy}-{'all' if unfreeze is None else unfreeze}"
                strategy_at = strategy
            configurations.setdefault(name, (strategy_at, unfreeze))
    seeds = sweep.seeds or (config.seed,)
    return [Point(name + (f"_{_tag(size)}" if len(sweep.sizes) > 1 else "") + (f"_seed{seed}" if len(seeds) > 1 else ""),
                  name, dataclasses.replace(config, strategy=strategy, unfreeze_blocks=unfreeze, seed=seed), size)
            for name, (strategy, unfreeze) in configurations.items() for size in sweep.sizes for seed in seeds]


def _tag(size: str) -> str:
    return size if size == "all" else f"f{size}" if "." in size else f"n{size}"


def nested_subsets(train: ImageSet, sizes: Sequence[str], seed: int) -> dict[str, ImageSet]:
    """Class-balanced training subsets, each inside the next larger one: per class, the first k images of one
    seeded shuffle (all of a class that has fewer). Each reads the whole training split's cached features."""
    labels = np.array(train.labels)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.flatnonzero(labels == k)) for k in range(len(train.classes))]
    subsets = {}
    for size in sizes:
        if size == "all":
            subsets[size] = train
            continue
        value = float(size)
        counts = [max(1, round(value * len(s))) if value < 1 else min(int(value), len(s)) for s in shuffled]
        indices = tuple(sorted(int(i) for s, k in zip(shuffled, counts) for i in s[:k]))
        subsets[size] = dataclasses.replace(train.subset(indices), within=(train, indices))
    return subsets


# ---------------------------------------------------------------- running it


Finish = Callable[[Comparison], None]


def run(config: TrainConfig, sweep: Sweep, out: str | Path, test: str | None = None, overwrite: bool = False,
        finish: Finish | None = None) -> Comparison:
    """Train every point of `sweep` and write the comparison to `out`; `finish` (the report) writes its own files
    into the comparison before it replaces `out`."""
    points = plan(config, sweep)
    folder = Folder(out)
    folder.begin(overwrite)
    return _sweep(folder, config, sweep, points, test, [], [], None, finish)


def resume(out: str | Path, finish: Finish | None = None, expected: tuple | None = None) -> Comparison:
    """Finish the points an interrupted comparison had left; the result is the uninterrupted one's. `expected`:
    (config, sweep, test) of the caller, which must be the ones the comparison began with."""
    folder = Folder(out)
    doc = folder.interrupted()
    config = TrainConfig.from_dict(doc["config"])
    began = (config, Sweep.from_dict(doc["sweep"]), doc["test"])
    if expected and _as_dicts(expected) != _as_dicts(began):
        changed = [k for k, a, b in zip(("options", "sweep", "test"), _as_dicts(expected), _as_dicts(began)) if a != b]
        raise TransferlabError(f"the interrupted comparison at {out} began with other {' and '.join(changed)}; resume "
                               "it with the same ones, or pass overwrite to start again")
    rows, failures = folder.rows(doc), [Failure(**f) for f in doc["failures"]]
    return _sweep(folder, config, began[1], plan(config, began[1]), doc["test"], rows, failures, doc["fingerprint"],
                  finish)


def _as_dicts(began: tuple) -> tuple:
    config, sweep_, test = began
    return ({k: v for k, v in config.to_dict().items() if k != "strategy"}, sweep_.to_dict(),
            None if test is None else str(test))


def _sweep(folder: Folder, config: TrainConfig, sweep_: Sweep, points: list[Point], test: str | None,
           rows: list[Row], failures: list[Failure], fingerprint: str | None, finish: Finish | None) -> Comparison:
    """Train the points not yet done, then write the comparison (and, through `finish`, its report) and put it
    in place of OUT."""
    with _cleanup_if_empty(folder, rows, failures), sigterm_interrupts():  # SIGTERM stops it as Ctrl-C does
        device = devices.resolve(config)
        with distributed.main_first():  # the others then read the main process's scan records
            splits = load_splits(config, test)
        if fingerprint and splits.fingerprint() != fingerprint:
            raise TransferlabError(f"the images for {folder.out} changed since it was interrupted, so it cannot "
                                   "continue as it began; start again with --overwrite")
        c = Comparison(config, sweep_, splits, backbones.block_names(config.backbone), device.describe(), rows,
                       failures, folder.staging)
        record = {"test": test, "fingerprint": splits.fingerprint()}
        folder.save(c.document() | record | {"complete": False})  # what --resume needs, from the first epoch on
        _train_points(c, points, folder, record, device)
        if not rows:
            raise TransferlabError(f"every point failed; the first: {failures[0].name}: {failures[0].error}")
        order = [p.name for p in points]
        rows.sort(key=lambda r: order.index(r.name))
        failures.sort(key=lambda f: order.index(f.name))
        folder.save(c.document() | record | analyse(c).to_dict() | {"complete": True})
        folder.write("comparison.csv", to_csv_rows(rows))
        if finish:
            finish(c)
        folder.commit()
        c.out = folder.out
        return c


def _train_points(c: Comparison, points: list[Point], folder: Folder, record: dict, device) -> None:
    """Each point not yet done, shallowest frozen prefix first, on its training subset and the shared feature
    store; progress recorded after each. A failure is recorded and the sweep goes on; Ctrl-C says how to resume."""
    subsets = nested_subsets(c.splits.train, c.sweep.sizes, c.config.seed)
    store = feature_store(c.config)
    rows, failures = c.rows, c.failures
    done = {r.name for r in rows} | {f.name for f in failures}
    for point in training_order(points):
        if point.name in done:
            continue
        done.add(point.name)
        note(f"== {point.name} ({len(done)}/{len(points)}) ==")
        row = None
        try:
            row = train_point(point, dataclasses.replace(c.splits, train=subsets[point.train_size]), folder.staging,
                              store, device)
            rows.append(row)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted with {len(rows) + len(failures)} of {len(points)} points done: "
                              f"continue with `transferlab compare --resume {folder.out}`") from None
        except Exception as e:  # recorded, and the sweep goes on
            failures.append(Failure(point.name, point.configuration, point.train_size, point.config.seed,
                                    str(e).splitlines()[0] if str(e) else type(e).__name__))
            note(f"{point.name} failed: {failures[-1].error}")
        folder.save(c.document() | record | {"complete": False}, row)


@contextlib.contextmanager
def _cleanup_if_empty(folder: Folder, rows: list[Row], failures: list[Failure]) -> Iterator[None]:
    """A comparison that stops before any point finished (a wrong folder, Ctrl-C in the first epochs) leaves no
    staging folder behind, so the next attempt starts afresh without --overwrite."""
    try:
        yield
    except BaseException as e:
        if not rows and not failures and not any(folder.staging.glob(".*.checkpoint.safetensors")):
            shutil.rmtree(folder.staging, ignore_errors=True)
            if isinstance(e, Interrupted):
                raise Interrupted("interrupted before any point finished; nothing was saved") from None
        raise


def compare(data, strategies=None, out=None, finish: Finish | None = None, **given) -> Comparison:
    """`transferlab.compare`: keyword options checked by name, then a new comparison or the rest of one."""
    config_options, sweep_options = options(given)
    if out is None:
        raise TransferlabError("compare needs out=, the folder to write the comparison to")
    test = None if given.get("test") is None else str(given["test"])
    config = TrainConfig(data=str(data), **config_options)
    wanted = sweep(strategies, **sweep_options)
    if given.get("resume"):
        return resume(out, finish, expected=(config, wanted, test))
    return run(config, wanted, out, test, bool(given.get("overwrite")), finish)


def options(given: dict) -> tuple[dict, dict]:
    """Split `tl.compare`'s keyword options into TrainConfig fields and sweep lists; a misspelled one is a
    one-line error that names the closest valid option."""
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "strategy")]
    valid = fields + list(SWEEP_OPTIONS) + ["test", "overwrite", "resume"]
    for name in given:
        if name not in valid:
            guess = difflib.get_close_matches(name, valid, 1)
            raise TransferlabError(f"unknown option {name!r} for compare" + (f"; did you mean {guess[0]!r}?" if guess
                                                                              else "") + f" (options: {', '.join(valid)})")
    return ({k: v for k, v in given.items() if k in fields and k != "unfreeze_blocks"},
            {k: v for k, v in given.items() if k in SWEEP_OPTIONS[1:]})


# ---------------------------------------------------------------- statistics


def wilson(accuracy: float, images: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on `images` images (a mean over seeds is rounded to
    the nearest whole count)."""
    ci = binomtest(int(round(accuracy * images)), images).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class Paired:
    """Two configurations on the same images: where A is right (more often, over seeds) and B not, and back."""

    wins: int
    losses: int
    p: float  # exact two-sided sign test; with one seed each, the exact McNemar test

    @classmethod
    def test(cls, a: np.ndarray, b: np.ndarray) -> Paired:
        wins, losses = int((a > b).sum()), int((a < b).sum())
        return cls(wins, losses, float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0)

    @property
    def separable(self) -> bool:
        return self.p < ALPHA


@dataclass
class Spread:
    """A number over seeds: its mean and sample standard deviation (0 with one seed)."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


@dataclass
class Summary:
    """One configuration at one training size, over its seeds."""

    configuration: str
    train_size: str
    rows: list[Row]

    @property
    def first(self) -> Row:
        return self.rows[0]

    def spread(self, value: Callable[[Row], float]) -> Spread:
        return Spread.of([value(r) for r in self.rows])

    @property
    def val_accuracy(self) -> Spread:
        return self.spread(lambda r: r.val.accuracy)

    @property
    def val_loss(self) -> Spread:
        return self.spread(lambda r: r.val.loss)

    @property
    def test_accuracy(self) -> Spread | None:
        return self.spread(lambda r: r.test.accuracy) if self.first.test else None

    @property
    def fit_seconds(self) -> Spread:
        return self.spread(lambda r: r.fit_seconds)

    @property
    def train_seconds(self) -> Spread:
        return self.spread(lambda r: r.train_seconds)

    @property
    def gap(self) -> float:
        """Overfitting: training minus validation accuracy, mean over seeds."""
        return float(np.mean([r.train_accuracy - r.val.accuracy for r in self.rows]))

    def right(self, labels: Sequence[int], split: str = "val") -> np.ndarray:
        """Per image: the share of seeds whose model got it right."""
        return np.mean([r.correct(labels, split) for r in self.rows], axis=0)

    def to_dict(self, labels: Sequence[int], test_labels: Sequence[int] | None) -> dict:
        first = self.first
        d = {"configuration": self.configuration, "strategy": first.strategy, "train_size": self.train_size,
             "train_images": first.train_images, "seeds": [r.seed for r in self.rows],
             "blocks_trained": first.blocks_trained, "trainable_params": first.trainable_params,
             "val_accuracy": asdict(self.val_accuracy),
             "val_accuracy_interval": wilson(self.val_accuracy.mean, len(labels)),
             "val_loss": asdict(self.val_loss), "fit_seconds": asdict(self.fit_seconds),
             "train_seconds": asdict(self.train_seconds)}
        if self.test_accuracy and test_labels is not None:
            d |= {"test_accuracy": asdict(self.test_accuracy),
                  "test_accuracy_interval": wilson(self.test_accuracy.mean, len(test_labels))}
        return d


def summaries(rows: Sequence[Row]) -> list[Summary]:
    """Rows grouped by configuration and training size, in the rows' order."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.configuration, r.train_size), []).append(r)
    return [Summary(name, size, group) for (name, size), group in groups.items()]


def ranked(group: Sequence[Summary]) -> list[Summary]:
    """Best first: mean validation accuracy, then the lower mean validation loss."""
    return sorted(group, key=lambda s: (-s.val_accuracy.mean, s.val_loss.mean))


@dataclass
class Option:
    """A configuration costlier than the recommended one: what it would add, and at what price."""

    configuration: str
    gain: float  # mean validation accuracy minus the recommended one's
    paired: Paired  # it against the recommended one, on the validation images
    fit_seconds: float
    times: float  # its fit seconds over the recommended one's


@dataclass
class Recommendation:
    configuration: str
    train_size: str
    best: str  # the highest mean validation accuracy
    versus_best: Paired | None  # the best against the recommended one (None: it is the best)
    gain_of_best: float
    accuracy: float
    interval: tuple[float, float]
    scored_on: str  # "test" or "validation"
    images: int
    seeds: int
    fit_seconds: float
    costlier: list[Option]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    """One training size of the learning curve: feature extraction against the best fine-tuned configuration."""

    train_size: str
    train_images: int
    feature_extraction: float
    fine_tuning: str
    fine_tuned: float
    paired: Paired  # fine-tuned against feature extraction, validation images

    @property
    def beat(self) -> bool:
        return self.fine_tuned > self.feature_extraction and self.paired.separable


@dataclass
class Curve:
    steps: list[Step]

    @property
    def from_size(self) -> str | None:
        """The smallest size from which on (at it and every larger one) fine-tuning beat feature extraction
        beyond noise; None if it did not at the largest."""
        since = None
        for step in reversed(self.steps):
            if not step.beat:
                break
            since = step.train_size
        return since

    def to_dict(self) -> dict:
        return {"from_size": self.from_size, "steps": [asdict(s) for s in self.steps]}


@dataclass
class Analysis:
    summaries: list[Summary]
    recommendation: Recommendation
    curve: Curve | None
    labels: list[int]
    test_labels: list[int] | None

    def to_dict(self) -> dict:
        return {"summaries": [s.to_dict(self.labels, self.test_labels) for s in self.summaries],
                "recommendation": self.recommendation.to_dict(),
                "learning_curve": self.curve and self.curve.to_dict()}


def analyse(c: Comparison) -> Analysis:
    labels = list(c.splits.val.labels)
    test_labels = list(c.splits.test.labels) if c.splits.test else None
    groups = summaries(c.rows)
    return Analysis(groups, recommend(groups, labels, test_labels), learning_curve(groups, labels), labels,
                    test_labels)


def largest(groups: Sequence[Summary]) -> list[Summary]:
    """The summaries at the largest training size: what the data the user has supports."""
    size = max(groups, key=lambda s: s.first.train_images).train_size
    return [s for s in groups if s.train_size == size]


def recommend(groups: Sequence[Summary], labels: list[int], test_labels: list[int] | None) -> Recommendation:
    """The cheapest configuration (training epochs' seconds) not significantly below the best on validation."""
    at = largest(groups)
    best = ranked(at)[0]
    right = {s.configuration: s.right(labels) for s in at}

    def below_best(s: Summary) -> bool:
        return s.val_accuracy.mean < best.val_accuracy.mean and Paired.test(right[best.configuration],
                                                                             right[s.configuration]).separable

    choice = min((s for s in at if not below_best(s)), key=lambda s: (s.fit_seconds.mean, -s.val_accuracy.mean))
    scored = choice.test_accuracy or choice.val_accuracy
    images = len(test_labels) if choice.test_accuracy else len(labels)
    costlier = [Option(s.configuration, s.val_accuracy.mean - choice.val_accuracy.mean,
                       Paired.test(right[s.configuration], right[choice.configuration]), s.fit_seconds.mean,
                       s.fit_seconds.mean / max(choice.fit_seconds.mean, 1e-9))
                for s in sorted(at, key=lambda s: s.fit_seconds.mean)
                if s is not choice and s.fit_seconds.mean > choice.fit_seconds.mean]
    return Recommendation(
        choice.configuration, choice.train_size, best.configuration,
        None if best is choice else Paired.test(right[best.configuration], right[choice.configuration]),
        best.val_accuracy.mean - choice.val_accuracy.mean, scored.mean, wilson(scored.mean, images),
        "test" if choice.test_accuracy else "validation", images, len(choice.rows), choice.fit_seconds.mean, costlier)


def learning_curve(groups: Sequence[Summary], labels: list[int]) -> Curve | None:
    """Feature extraction against the best fine-tuned configuration at every training size; None without
    several sizes, feature extraction, or any fine-tuning."""
    sizes = list(dict.fromkeys(s.train_size for s in groups))
    if len(sizes) < 2:
        return None
    steps = []
    for size in sizes:
        at = [s for s in groups if s.train_size == size]
        fe = next((s for s in at if s.first.blocks_trained == 0), None)
        tuned = ranked([s for s in at if s.first.blocks_trained > 0])
        if fe is None or not tuned:
            return None
        ft = tuned[0]
        steps.append(Step(size, ft.first.train_images, fe.val_accuracy.mean, ft.configuration, ft.val_accuracy.mean,
                          Paired.test(ft.right(labels), fe.right(labels))))
    return Curve(sorted(steps, key=lambda s: s.train_images))
