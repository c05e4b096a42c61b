"""The report's figures: accuracy, loss and time against blocks trained, learning curves, per-epoch curves,
confusion matrices, ROC curves, cost, and Grad-CAM of where each model looks.

matplotlib's object API (no pyplot): no global backend or state, no display needed. Accuracy axes never turn a
one-image difference into a cliff (`accuracy_axis`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, MultipleLocator
from sklearn import metrics as skm

from .comparison import Comparison, Row
from .feeds import ImageDataset
from .model import Classifier
from .predict import probabilities
from .studies import Analysis, Summary, analyse, largest, ranked

PERCENT = FuncFormatter(lambda x, _: f"{100 * x:.4g}%")  # 99.25%, 99.5%, 100%: no more digits than needed
MIN_SPAN_IMAGES = 20  # an accuracy axis spans at least this many images' worth, so one image is never a cliff
GRADCAM_COLUMNS = 6
MISTAKES_SHOWN = 12
MANY_CLASSES = 5  # from here on, one large confusion matrix of the best model instead of one per configuration


@dataclass
class View:
    """What the report draws from: the comparison, its analysis, and the rows that stand for each configuration."""

    c: Comparison
    analysis: Analysis
    main: list[Row]  # one per configuration, at the largest training size, its first seed
    best: Row  # of the best configuration (highest mean validation accuracy)
    styles: dict[str, tuple[str, str]]  # configuration -> (colour, marker)

    @classmethod
    def of(cls, c: Comparison) -> View:
        analysis = analyse(c)
        top = largest(analysis.summaries)
        palette = colormaps["tab10" if len(analysis.summaries) <= 10 else "tab20"].colors
        names = list(dict.fromkeys(r.configuration for r in c.rows))
        styles = {n: (palette[i % len(palette)], "osD^vP*Xhp"[i % 10]) for i, n in enumerate(names)}
        return cls(c, analysis, [s.first for s in top], ranked(top)[0].first, styles)

    @property
    def labels(self) -> np.ndarray:
        return np.array(self.c.splits.val.labels)

    @property
    def classes(self) -> list[str]:
        return self.c.splits.classes

    @property
    def seeds(self) -> int:
        return max(len(s.rows) for s in self.analysis.summaries)

    @property
    def sizes(self) -> list[str]:
        return list(dict.fromkeys(s.train_size for s in self.analysis.summaries))


def accuracy_axis(ax: Axes, images: int, label: str, compact: bool = False) -> None:
    """Percent ticks no finer than one image's worth, a span of at least MIN_SPAN_IMAGES images (so a one-image
    difference never looks like a cliff), and a label that says what one image is worth."""
    step = 1 / images
    lo, hi = ax.get_ylim()
    span = min(1.0, max(hi - lo, MIN_SPAN_IMAGES * step))
    middle = (lo + hi) / 2
    lo, hi = middle - span / 2, middle + span / 2
    lo, hi = (lo - (hi - 1), 1.0) if hi > 1 else (0.0, span) if lo < 0 else (lo, hi)
    ax.set_ylim(max(0.0, lo), hi + span * 0.02)
    ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    ax.yaxis.set_major_locator(MultipleLocator(max(step, ticks[1] - ticks[0])))
    ax.yaxis.set_major_formatter(PERCENT)
    worth = f"{100 * step:.2g} points"
    ax.set_ylabel(f"{label}, 1 image = {worth}" if compact else f"{label}\n({images:,} images; one image = {worth})")


def figures(v: View) -> dict[str, tuple[str, Figure]]:
    """name -> (caption, figure), in report order."""
    c, main, best = v.c, v.main, v.best
    classes = len(v.classes)
    staged = any(len(r.stages) > 1 for r in main)
    averaged = "" if classes == 2 else f", one-vs-rest and micro-averaged over the {classes} classes"
    seeds = f" Points: mean over {v.seeds} seeds; bars: ± one standard deviation." if v.seeds > 1 else ""
    figures = {}
    families = _depth_families(v)
    if families:
        figures["depth"] = (
            "Validation accuracy (test dashed), loss and training time against the number of blocks trained, counted "
            "from the top; the label under each count is the lowest block trained." + seeds, _depth(v, families))
    if len(v.sizes) > 1:
        figures["learning_curve"] = (
            "Validation accuracy (test dashed) against the number of training images (nested, class-balanced "
            "subsets; the same validation images throughout)." + seeds, _learning_curve(v))
    figures |= {
        "val_accuracy": ("Validation accuracy per epoch; a star marks the best epoch, the one each model was "
                         "restored to." + _seed_note(v), _curves(v, "val_accuracy", "Validation accuracy")),
        "val_loss": ("Validation loss per epoch (lower is better); early stopping and best-epoch restore use it."
                     + _seed_note(v), _curves(v, "val_loss", "Validation loss")),
        "train_vs_val": ("Training vs validation, per configuration: a widening gap is overfitting."
                         + (" Dotted line: the next stage unfreezes blocks." if staged else ""), _train_vs_val(v)),
        "confusion": (("Confusion matrices on the validation set (rows: true class, columns: predicted; confusions "
                       "in red)."
                       if classes < MANY_CLASSES else
                       f"Confusion matrix of {best.configuration} (the best model) on the validation set: counts; "
                       "right answers in blue by their share of the true class (rows), confusions in red, darkest for "
                       "the most frequent; empty where zero."), _confusions(v)),
        "roc": (f"ROC curves on the validation set{averaged}; on the right, the corner where they differ.", _roc(v)),
        "accuracy_vs_time": ("Validation accuracy against the training epochs' time (the one-off frozen-prefix pass "
                             "not counted): up and to the left is better." + seeds, _accuracy_vs_time(v)),
        "blocks": ("Which blocks each configuration trains (green) and keeps frozen (grey), per stage.",
                   _blocks(main, c.blocks)),
    }
    pick = _sample(v.labels, max(GRADCAM_COLUMNS, min(classes, 10)), c.config.seed)
    figures["gradcam"] = (
        "Grad-CAM on validation images of different classes: where each configuration's model looks for the class "
        "it predicts (red = strongest). Green title: right, red: wrong.", _gradcam_grid(v, pick))
    wrong = np.flatnonzero(best.val_probs.argmax(1) != v.labels)
    if len(wrong):
        figures["mistakes"] = (
            f"Validation images that {best.configuration} (the best model) gets wrong, the true classes taking turns, "
            "most confident first, each beside its Grad-CAM.", _mistakes(v, wrong))
    return figures


def _seed_note(v: View) -> str:
    return f" One line per configuration: its first seed ({v.main[0].seed})." if v.seeds > 1 else ""


def _depth_families(v: View) -> dict[str, list[Summary]]:
    """Configurations that differ only in depth, at the largest training size: partial (with feature extraction
    at 0 blocks and full at all) and two-stage (with feature extraction at 0); each needs two depths or more."""
    top = largest(v.analysis.summaries)
    families = {"partial": [s for s in top if s.first.strategy in ("feature-extraction", "partial", "full")],
                "two-stage": [s for s in top if s.first.strategy in ("feature-extraction", "two-stage")]}
    return {name: sorted(group, key=lambda s: s.first.blocks_trained) for name, group in families.items()
            if len({s.first.blocks_trained for s in group}) > 1
            and (name == "partial" or any(s.first.strategy == "two-stage" for s in group))}


def _depth(v: View, families: dict[str, list[Summary]]) -> Figure:
    """Blocks trained on an evenly spaced axis (0, 1, 2, 3 and all would crowd on a linear one)."""
    blocks = v.c.blocks
    depths = sorted({s.first.blocks_trained for g in families.values() for s in g})
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    acc, loss, cost = fig.subplots(1, 3)
    panels = [(acc, lambda r: r.val.accuracy, "-", "validation"), (loss, lambda r: r.val.loss, "-", None),
              (cost, lambda r: r.fit_seconds, "-", None)]
    if v.c.splits.test:
        panels.append((acc, lambda r: r.test.accuracy, "--", "test"))
    for k, (family, group) in enumerate(families.items()):
        x = [depths.index(s.first.blocks_trained) for s in group]
        for ax, value, ls, label in panels:
            spreads = [s.spread(value) for s in group]
            named = f"{family}: {label}" if len(families) > 1 and label else label
            ax.errorbar(x, [p.mean for p in spreads], yerr=[p.std for p in spreads], ls=ls, marker="os"[k],
                        color=f"C{k}", capsize=3, label=named)
    names = [f"{t}\n" + ("head only" if t == 0 else "all" if t == len(blocks) else blocks[len(blocks) - t])
             for t in depths]
    for ax, title in ((acc, "Accuracy"), (loss, "Validation loss"), (cost, "Training epochs' time")):
        ax.set_xticks(range(len(depths)), names, fontsize=8 if len(depths) <= 6 else 7)
        ax.set(title=f"{title} against blocks trained",
               xlabel="blocks trained from the top, and the lowest of them")
        ax.grid(alpha=0.3)
    accuracy_axis(acc, len(v.c.splits.val), "accuracy")
    loss.set_ylabel("validation loss")
    cost.set_ylabel("seconds")
    if acc.get_legend_handles_labels()[0]:
        acc.legend(fontsize=8)
    return fig


def _learning_curve(v: View) -> Figure:
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    by_config: dict[str, list[Summary]] = {}
    for s in v.analysis.summaries:
        by_config.setdefault(s.configuration, []).append(s)
    for name, group in by_config.items():
        group = sorted(group, key=lambda s: s.first.train_images)
        x = [s.first.train_images for s in group]
        color, marker = v.styles[name]
        acc = [s.val_accuracy for s in group]
        ax.errorbar(x, [a.mean for a in acc], yerr=[a.std for a in acc], marker=marker, color=color, capsize=3,
                    label=name)
        if v.c.splits.test:
            ax.plot(x, [s.test_accuracy.mean for s in group], "--", color=color, alpha=0.7)
    sizes = sorted({s.first.train_images for s in v.analysis.summaries})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set(title="Learning curves", xlabel="training images (log scale)")
    accuracy_axis(ax, len(v.c.splits.val), "validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _curves(v: View, key: str, title: str) -> Figure:
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    rows = v.main
    for i, r in enumerate(rows):  # earlier curves wider, so one that coincides with a later one still shows
        color, marker = v.styles[r.configuration]
        wide = len(rows) - i
        ax.plot([h["epoch"] for h in r.history], [h[key] for h in r.history], "-", marker=marker,
                lw=0.6 + 0.6 * wide / max(1, len(rows) / 4), ms=2.5 + 1.5 * min(wide, 4), color=color,
                label=r.configuration)
        best = r.history[r.best_epoch - 1]
        ax.plot(best["epoch"], best[key], "*", ms=16, color=color, mec="black", mew=0.8)
    ax.set(title=f"{title} per epoch", xlabel="epoch", xlim=(0.5, max(r.epochs_run for r in rows) + 0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if "accuracy" in key:
        accuracy_axis(ax, len(v.c.splits.val), title.lower())
    else:
        ax.set_ylabel(title.lower())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _train_vs_val(v: View) -> Figure:
    rows = v.main
    fig = Figure(figsize=(10, 2.4 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, pair in zip(rows, axes):
        history = r.history
        epochs = [h["epoch"] for h in history]
        unfreeze = [h["epoch"] - 0.5 for prev, h in zip(history, history[1:]) if h["stage"] != prev["stage"]]
        for ax, metric in zip(pair, ("accuracy", "loss")):
            ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o--", ms=3, color="tab:gray", label="train")
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", ms=3, color=v.styles[r.configuration][0],
                    label="validation")
            for x in unfreeze:
                ax.axvline(x, ls=":", color="black")
            ax.set_title(f"{r.configuration}: {metric}", fontsize=10)
            if metric == "accuracy":
                accuracy_axis(ax, len(v.c.splits.val), "accuracy", compact=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0.5, len(history) + 0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    return fig


def _grid(n: int, columns: int, cell: tuple[float, float]) -> tuple[Figure, list]:
    """A figure of n axes in rows of `columns`; unused cells hidden."""
    rows = -(-n // columns)
    columns = min(n, columns)
    fig = Figure(figsize=(cell[0] * columns, cell[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _matrix(ax: Axes, m: np.ndarray, classes: list[str], title: str) -> None:
    """Counts in their cells: right answers in blues by their share of the true class, confusions in reds scaled
    to the worst one, so that the errors stand out; empty cells left blank."""
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    diagonal = np.eye(len(m), dtype=bool)
    ax.imshow(np.ma.masked_where(~diagonal, share), cmap="Blues", vmin=0, vmax=1)
    worst = share[~diagonal].max(initial=0)
    ax.imshow(np.ma.masked_where(diagonal | (m == 0), share), cmap="Reds", vmin=0, vmax=max(worst, 1e-9) * 1.25)
    size = 11 if len(classes) <= 6 else max(6, 13 - len(classes) // 3)
    for (i, j), n in np.ndenumerate(m):
        if n:
            dark = share[i, j] > 0.5 if i == j else share[i, j] > 0.6 * worst * 1.25
            ax.text(j, i, str(n), ha="center", va="center", fontsize=size, color="white" if dark else "black")
    ticks = range(len(classes))
    slanted = len(classes) > 3 or max(map(len, classes)) > 8
    ax.set_xticks(ticks, classes, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                  rotation_mode="anchor", fontsize=min(10, size + 1))
    ax.set_yticks(ticks, classes, fontsize=min(10, size + 1))
    ax.set(xlabel="predicted", ylabel="true", title=title)


def _confusions(v: View) -> Figure:
    classes = v.classes
    if len(classes) >= MANY_CLASSES:
        side = max(5.0, 0.42 * len(classes) + 2.2)
        fig = Figure(figsize=(side, side), layout="constrained")
        _matrix(fig.add_subplot(), np.array(v.best.val.confusion), classes,
                f"{v.best.configuration}: {_percent(v.best.val.accuracy)} right")
        return fig
    rows = v.main
    fig, axes = _grid(len(rows), -(-len(rows) // -(-len(rows) // 4)), (3.6, 3.4))  # at most 4 a row, rows even
    for r, ax in zip(rows, axes):
        _matrix(ax, np.array(r.val.confusion), classes, f"{r.configuration}: {_percent(r.val.accuracy)}")
    return fig


def _roc(v: View) -> Figure:
    """Binary: the second class is positive. Multi-class: one-vs-rest, micro-averaged. The right panel zooms
    into the corner where good models differ: from the lowest true positive rate before any false positive to
    the false positive rate at which the last curve finds every positive."""
    labels, classes = v.labels, len(v.classes)
    curves = {}
    for r in v.main:
        p = r.val_probs
        truth, score = (labels, p[:, 1]) if classes == 2 else (np.eye(classes)[labels].ravel(), p.ravel())
        curves[r.configuration] = skm.roc_curve(truth, score)[:2]
    width = max(0.01, max(fpr[np.argmax(tpr >= 1)] for fpr, tpr in curves.values()))
    height = max(0.01, 1 - min(tpr[fpr == 0].max() for fpr, tpr in curves.values()))
    fig = Figure(figsize=(11, 5), layout="constrained")
    whole, corner = fig.subplots(1, 2)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        for ax in (whole, corner):
            ax.plot(fpr, tpr, color=v.styles[name][0], lw=0.8 + 0.7 * min(4, len(curves) - i),
                    label=f"{name} (AUC {skm.auc(fpr, tpr):.4f})")
    whole.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    averaged = "" if classes == 2 else " (one-vs-rest, micro-averaged)"
    whole.set(title=f"ROC on the validation set{averaged}", xlabel="false positive rate", ylabel="true positive rate")
    corner.set(title="Zoom on the top-left corner", xlabel="false positive rate",
               xlim=(-0.05 * width, 1.1 * width), ylim=(1 - 1.15 * height, 1 + 0.05 * height))
    corner.legend(loc="lower right", fontsize=8)
    for ax in (whole, corner):
        ax.grid(alpha=0.3)
    return fig


def _accuracy_vs_time(v: View) -> Figure:
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    top = largest(v.analysis.summaries)
    for s in top:
        color, marker = v.styles[s.configuration]
        ax.errorbar(s.fit_seconds.mean, s.val_accuracy.mean, xerr=s.fit_seconds.std, yerr=s.val_accuracy.std,
                    fmt=marker, ms=10, color=color, mec="black", capsize=3, label=s.configuration)
    seconds = [s.fit_seconds.mean for s in top]
    if max(seconds) > 20 * max(min(seconds), 1e-9):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.margins(x=0.15, y=0.2)
    ax.set(title="Accuracy vs training time", xlabel="training epochs' time (s)")
    accuracy_axis(ax, len(v.c.splits.val), "validation accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _blocks(rows: list[Row], blocks: list[str]) -> Figure:
    lines = [(r.configuration + (f" · stage {i}" if len(r.stages) > 1 else "")
              + (" (random init)" if r.weights.startswith("none") else ""), s)
             for r in rows for i, s in enumerate(r.stages, 1)]
    trained = np.array([[i >= s.frozen for i in range(len(blocks))] + [True] for _, s in lines])
    fig = Figure(figsize=(max(7.0, 0.55 * len(blocks) + 3), 0.45 * len(lines) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(trained, cmap=ListedColormap(["#d9d9d9", "#2ca02c"]), vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(blocks) + 1), blocks + ["head"], rotation=45, ha="right")
    ax.set_yticks(range(len(lines)), [name for name, _ in lines])
    ax.set_xticks(np.arange(-0.5, len(blocks) + 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(lines)), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="both", length=0)
    ax.set_title("Blocks trained per configuration (input on the left)")
    fig.legend(handles=[Patch(color="#2ca02c", label="trained"), Patch(color="#d9d9d9", label="frozen")],
               loc="outside lower center", ncols=2)
    return fig


# ---------------------------------------------------------------- Grad-CAM


def grad_cam(model: Classifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """([N, H, W] heatmaps in [0, 1], [N, classes] probabilities) for uint8 images [N, 3, H, W].

    The gradient of the predicted class's score is taken at the last block's output, so only the head is
    differentiated. A one-logit binary head scores class 1 with +logit and class 0 with -logit.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        features = model.features(images.to(device)).float()
    features.requires_grad_()
    logits = model.head(features).float()
    probs = probabilities(logits.detach())
    predicted = probs.argmax(1)
    score = logits[:, 0] * (2 * predicted - 1) if logits.shape[1] == 1 else logits.gather(1, predicted[:, None])[:, 0]
    (grads,) = torch.autograd.grad(score.sum(), features)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)
    return cam.detach().cpu().numpy(), probs.cpu().numpy()


def _sample(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """`count` validation images, the classes taking turns, chosen by the seed."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == k)).tolist() for k in np.unique(labels)]
    return _take_turns(by_class, count)


def _take_turns(groups: list[list[int]], count: int) -> list[int]:
    return [i for group in itertools.zip_longest(*groups) for i in group if i is not None][:count]


def _images(v: View, indices) -> torch.Tensor:
    """The validation images as the models see them: resized, centre-cropped, uint8."""
    dataset = ImageDataset(v.c.splits.val.subset(indices), v.c.preprocessing)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _show(ax, image: torch.Tensor, cam: np.ndarray | None, title: str, color: str = "black") -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9, color=color)
    ax.set_axis_off()


def _gradcam_columns(v: View) -> list[Row]:
    """At most GRADCAM_COLUMNS configurations: the best and the recommended one first among them."""
    keep = {v.best.configuration, v.analysis.recommendation.configuration}
    rows = [r for r in v.main if r.configuration in keep] + [r for r in v.main if r.configuration not in keep]
    return sorted(rows[:GRADCAM_COLUMNS], key=v.main.index)


def _gradcam_grid(v: View, indices: list[int]) -> Figure:
    images, classes, columns = _images(v, indices), v.classes, _gradcam_columns(v)
    truth = [v.c.splits.val.labels[i] for i in indices]
    fig = Figure(figsize=(2.1 * (len(columns) + 1), 2.25 * len(indices)), layout="constrained")
    axes = fig.subplots(len(indices), len(columns) + 1, squeeze=False)
    for row, (image, label) in enumerate(zip(images, truth)):
        _show(axes[row][0], image, None, ("image\n" if row == 0 else "") + f"true: {classes[label]}")
    for col, r in enumerate(columns, 1):
        cams, probs = grad_cam(v.c.run(r.name).model, images)
        for row, (cam, p, label) in enumerate(zip(cams, probs, truth)):
            k = int(p.argmax())
            _show(axes[row][col], images[row], cam, (f"{r.configuration}\n" if row == 0 else "")
                  + f"{classes[k]} {p[k]:.2f}", "tab:green" if k == label else "tab:red")
    return fig


def _mistakes(v: View, wrong: np.ndarray) -> Figure:
    """Each wrong image twice: as it is (is the label right?) and with the best model's Grad-CAM; the true classes
    take turns, so one class's many mistakes do not hide the others'."""
    best, classes = v.best, v.classes
    probs = best.val_probs
    labels = v.labels
    by_class = [sorted(wrong[labels[wrong] == k].tolist(), key=lambda i: -probs[i].max()) for k in range(len(classes))]
    shown = _take_turns([g for g in by_class if g], MISTAKES_SHOWN)
    images = _images(v, shown)
    cams, _ = grad_cam(v.c.run(best.name).model, images)
    fig, axes = _grid(2 * len(shown), 6, (2.1, 2.3))
    for plain, overlay, i, image, cam in zip(axes[::2], axes[1::2], shown, images, cams):
        k = int(probs[i].argmax())
        _show(plain, image, None, f"true {classes[labels[i]]}\n→ {classes[k]} {probs[i][k]:.2f}", "tab:red")
        _show(overlay, image, cam, "\nGrad-CAM")
    most = f", {len(shown)} shown" if len(shown) < len(wrong) else ""
    fig.suptitle(f"{best.configuration} gets {len(wrong)} of {len(probs)} validation images wrong{most}")
    return fig


def _percent(x: float) -> str:
    return f"{x:.1%}"
