"""The comparison report: plots, Grad-CAM, and one list of sections rendered twice, as self-contained HTML
(every image inlined as a data URI, so it opens offline and can be mailed) and as Markdown beside the PNGs.

Figures use matplotlib's object API (no pyplot): no global backend or state, no display needed.
Every observation is a sentence filled from this comparison's numbers.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from sklearn import metrics as skm

from . import distributed
from .compare import Comparison, table
from .data import ImageSet
from .feeds import ImageDataset
from .model import Classifier
from .runs import write_atomic
from .strategies import STRATEGIES
from .predict import probabilities

COLORS = dict(zip(STRATEGIES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
MARKERS = dict(zip(STRATEGIES, "osD^v"))
PERCENT = FuncFormatter(lambda x, _: f"{100 * x:.4g}%")  # 99.25%, 99.5%, 100%: no more digits than needed
GRADCAM_IMAGES = 6
MISTAKES_SHOWN = 12


@dataclass
class Section:
    title: str
    points: list[str] = field(default_factory=list)
    table: list[list[str]] | None = None  # first row is the header
    figures: list[str] = field(default_factory=list)  # names of plots/<name>.png


@distributed.main_only
def write(c: Comparison) -> None:
    """plots/*.png, report.html and report.md under the comparison's folder."""
    figures = _figures(c)
    pngs = {}
    (c.out / "plots").mkdir(parents=True, exist_ok=True)
    for name, (_, fig) in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        pngs[name] = buffer.getvalue()
        write_atomic(c.out / "plots" / f"{name}.png", pngs[name])
    captions = {name: caption for name, (caption, _) in figures.items()}
    title = f"Fine-tuning strategies compared: {c.config.backbone} on {c.splits.train.root}"
    sections = _sections(c, list(figures))
    write_atomic(c.out / "report.html", render_html(title, sections, captions, pngs))
    write_atomic(c.out / "report.md", render_markdown(title, sections, captions))


# ---------------------------------------------------------------- text


def _sections(c: Comparison, figures: list[str]) -> list[Section]:
    def present(*names: str) -> list[str]:
        return [n for n in names if n in figures]

    def trains(names: list[str]) -> str:
        return " + ".join(([f"all {len(c.blocks)} blocks"] if names == c.blocks else names) + ["head"])

    stages = [["strategy", "stage", "trains", "max epochs", "head lr", "backbone lr"]] + [
        [r["strategy"], str(i), trains(s["trained_blocks"]), str(s["epochs"]), f"{s['head_lr']:g}",
         f"{s['backbone_lr']:g}"] for r in c.rows for i, s in enumerate(r["stages"], 1)]
    flawless = [] if "mistakes" in figures else [
        f"{c.best['strategy']} (the best model) gets all {len(c.splits.val):,} validation images right, so there is "
        "no gallery of its mistakes."]
    return [
        Section("Set-up", table=[["", ""]] + _setup(c)),
        Section("Results", [
            "train acc: running accuracy during the best epoch (dropout and augmentation on). val and test: the "
            "restored best model. seconds: training time, validation passes included."],
            table=table(c.rows)),
        Section("Observations", observations(c)),
        Section("Training curves", figures=present("val_accuracy", "val_loss", "train_vs_val")),
        Section("Errors", figures=present("confusion", "roc")),
        Section("Cost", table=stages, figures=present("accuracy_vs_time", "blocks")),
        Section("Where the models look (Grad-CAM)", flawless, figures=present("gradcam", "mistakes")),
    ]


def _counts(images: ImageSet) -> str:
    return f"{len(images):,} (" + ", ".join(f"{k} {v:,}" for k, v in images.counts().items()) + ")"


def _setup(c: Comparison) -> list[list[str]]:
    s, cfg = c.splits, c.config
    summary = s.summary()
    skipped, duplicates = summary["skipped"], summary["duplicates"]
    pre = c.preprocessing
    sources: dict[str, list[str]] = {}
    for r in c.rows:
        sources.setdefault(r["weights"], []).append(r["strategy"])
    val_from = (f"folder {s.val.root}" if s.val.root != s.train.root
                else f"{cfg.val_split:.0%} of the training folder, stratified, seed {cfg.seed}")
    rows = [
        ["training images", f"{_counts(s.train)} from {s.train.root}"],
        ["validation images", f"{_counts(s.val)}, {val_from}"],
        *([["test images", f"{_counts(s.test)} from {s.test.root}"]] if s.test else []),
        ["skipped files", f"{len(skipped)}" + "".join(
            f"; {x['split']}: {x['path']} ({x['reason']})" for x in skipped[:10])
            + (f"; {len(skipped) - 10} more in comparison.json" if len(skipped) > 10 else "")],
        ["duplicates across splits", f"{len(duplicates)}" + "".join(f"; {d['a']} = {d['b']}" for d in duplicates[:5])],
        ["backbone", f"{cfg.backbone}: {len(c.blocks)} blocks ({', '.join(c.blocks)})"],
        ["input", f"{pre.size} px (short side resized to {pre.resize}, {pre.interpolation}, centre crop), "
                  f"{'BGR, ' if pre.channels == 'BGR' else ''}mean {_floats(pre.mean)}, std {_floats(pre.std)}"],
        ["weights", "; ".join(f"{src}: {', '.join(names)}" for src, names in sources.items())],
    ]
    skip = {"data", "val", "val_split", "strategy", "weights", "backbone", "cache_dir", "cache_ram_gb", "cache_max_gb",
            "workers", "max_pixels"}
    skip |= {"cache_views"} if cfg.augment == "none" else set()  # one exact view without augmentation
    return rows + [[k.replace("_", " "), _value(v)] for k, v in cfg.to_dict().items() if k not in skip]


def _value(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return "default" if v is None else str(v)


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 or x == 0 else f"{100 * x:.2g}%"  # 0.038%, not 0.0%


def _many(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _seconds(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.2g} s"


def mcnemar(wins: int, losses: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split of the discordant images this uneven is by chance."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n)


def observations(c: Comparison) -> list[str]:
    """Which strategy won and by how much, the overfitting gap, the time and parameters each cost."""
    ranked = sorted(c.rows, key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    labels = np.array(c.splits.val.labels)
    right = {name: p.argmax(1) == labels for name, p in c.val_probs.items()}

    def versus(other: dict) -> str:
        """The winner against `other`, image by image."""
        a, b = right[ranked[0]["strategy"]], right[other["strategy"]]
        wins, losses = int((a & ~b).sum()), int((~a & b).sum())
        if not wins + losses:
            return "both got exactly the same validation images right"
        p = mcnemar(wins, losses)
        verdict = "unlikely to be chance" if p < 0.05 else f"a gap this size can be chance on {len(labels)} images"
        return (f"right on {_many(wins, 'validation image')} that {other['strategy']} got wrong and wrong on "
                f"{losses} it got right (exact McNemar p = {p:.2g}: {verdict})")

    return _accuracy_notes(c, ranked, versus) + [_gap_note(c.rows)] + _cost_notes(c, ranked[0], versus)


def _accuracy_notes(c: Comparison, ranked: list[dict], versus) -> list[str]:
    best = ranked[0]
    notes = ["Validation accuracy: " + ", ".join(f"{r['strategy']} {_pct(r['val_accuracy'])}" for r in ranked) + "."]
    if len(ranked) > 1:
        second = ranked[1]
        margin = best["val_accuracy"] - second["val_accuracy"]
        lead = (f"{_points(margin)} ahead of {second['strategy']}" if margin > 0 else
                f"tied on accuracy with {second['strategy']} but with a lower validation loss "
                f"({best['val_loss']:.4f} vs {second['val_loss']:.4f})")
        notes.append(f"{best['strategy']} won, {lead}: {versus(second)}.")
    lowest_loss = min(ranked, key=lambda r: r["val_loss"])
    if lowest_loss is not best:
        notes.append(f"The lowest validation loss is {lowest_loss['strategy']}'s ({lowest_loss['val_loss']:.4f}; "
                     f"{best['strategy']}: {best['val_loss']:.4f}).")
    if "test_accuracy" in best:
        by_test = sorted(ranked, key=lambda r: -r["test_accuracy"])
        top = [r for r in by_test if r["test_accuracy"] == by_test[0]["test_accuracy"]]
        verdict = (f"{best['strategy']} is {'joint ' if len(top) > 1 else ''}best there too" if best in top
                   else f"{', '.join(r['strategy'] for r in top)} lead{'s' if len(top) == 1 else ''} there")
        notes.append(f"Test accuracy ({len(c.splits.test):,} images): "
                     + ", ".join(f"{r['strategy']} {_pct(r['test_accuracy'])}" for r in by_test) + f"; {verdict}.")
    return notes


def _gap_note(rows: list[dict]) -> str:
    gaps = {r["strategy"]: r["train_accuracy"] - r["val_accuracy"] for r in rows}
    negative = (" A negative gap means training accuracy, measured with dropout (and augmentation) on, trailed "
                "validation." if min(gaps.values()) < 0 else "")
    return ("Overfitting gap, training minus validation accuracy: "
            + ", ".join(f"{name} {_points(g)}" for name, g in gaps.items())
            + f"; widest: {max(gaps, key=gaps.get)}.{negative}")


def _cost_notes(c: Comparison, best: dict, versus) -> list[str]:
    fastest = min(c.rows, key=lambda r: r["train_seconds"])

    def times(r: dict) -> str:
        return f"{r['train_seconds'] / fastest['train_seconds']:.1f}×"

    notes = [f"Training time: {fastest['strategy']} {_seconds(fastest['train_seconds'])} (fastest)" + "".join(
        f"; {r['strategy']} {_seconds(r['train_seconds'])} ({times(r)} {fastest['strategy']})"
        for r in c.rows if r is not fastest) + "."]
    if fastest is not best:
        gain = best["val_accuracy"] - fastest["val_accuracy"]
        bought = f"{_points(gain)} over" if gain else "no accuracy over"
        notes.append(f"{best['strategy']} bought {bought} {fastest['strategy']} with {times(best)} the time; "
                     f"it was {versus(fastest)}.")
    computed = [f"{r['strategy']} {r['features_computed']}" for r in c.rows if r["features_computed"]]
    if computed:
        notes.append("Times include computing the frozen-prefix features that were not cached yet (arrays computed: "
                     + ", ".join(computed) + "); other strategies read them from the shared cache.")
    elif c.config.cache and any(s["frozen"] for r in c.rows for s in r["stages"]):
        notes.append("Every frozen-prefix feature array came from the feature cache, filled by an earlier run: the "
                     "times of strategies with frozen blocks do not include running those blocks once.")
    notes.append("Trainable parameters: " + ", ".join(
        f"{r['strategy']} {r['trainable_params']:,} ({_pct(r['trainable_params'] / r['total_params'])})"
        for r in c.rows) + ".")
    still = [r["strategy"] for r in c.rows if r["best_epoch"] == r["epochs_run"]]
    if still:
        notes.append(f"Validation loss was still falling at the last epoch for {', '.join(still)}: "
                     "more epochs may help.")
    stopped = [f"{r['strategy']} after epoch {r['epochs_run']} (best {r['best_epoch']})" for r in c.rows
               if r["epochs_run"] < sum(s["epochs"] for s in r["stages"])]
    if stopped:
        notes.append("Early stopping ended " + ", ".join(stopped) + ".")
    return notes


def _cell(tag: str, text: str, numbers_right: bool) -> str:
    align = ' class="n"' if numbers_right and re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?%?", text) else ""
    return f"<{tag}{align}>{html.escape(text)}</{tag}>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}.wide{overflow-x:auto}table{border-collapse:collapse;margin:.8em 0;
font-size:.88em}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1.5em 0}img{max-width:100%}
figcaption{color:#555;font-size:.95em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def render_html(title: str, sections: list[Section], captions: dict[str, str], pngs: dict[str, bytes]) -> str:
    """One file with every image inside it as a base64 data URI."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.points:
            parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in s.points) + "</ul>")
        if s.table:
            head, *body = s.table
            numeric = any(head)  # a key/value table (no header) reads better left-aligned
            header = "<tr>" + "".join(_cell("th", h, numeric) for h in head) + "</tr>" if numeric else ""
            parts.append("<div class='wide'><table>" + header + "".join(
                "<tr>" + "".join(_cell("td", c, numeric) for c in row) + "</tr>" for row in body) + "</table></div>")
        for name in s.figures:
            data = base64.b64encode(pngs[name]).decode()
            parts.append(f"<figure><img alt='{html.escape(captions[name])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
    return "\n".join(parts + ["</body></html>"])


def render_markdown(title: str, sections: list[Section], captions: dict[str, str]) -> str:
    """The same report, with the images as plots/<name>.png beside it."""
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"# {title}"]
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        lines += [f"- {p}" for p in s.points]
        if s.table:
            lines += ["", row(s.table[0]), row(["---"] * len(s.table[0]))] + [row(r) for r in s.table[1:]]
        for name in s.figures:
            lines += ["", f"![{captions[name]}](plots/{name}.png)", "", f"*{captions[name]}*"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _figures(c: Comparison) -> dict[str, tuple[str, Figure]]:
    """name -> (caption, figure), in report order."""
    labels, classes = np.array(c.splits.val.labels), len(c.splits.classes)
    best = c.best["strategy"]
    staged = any(len(r["stages"]) > 1 for r in c.rows)
    averaged = "" if classes == 2 else f", one-vs-rest and micro-averaged over the {classes} classes"
    figures = {
        "val_accuracy": ("Validation accuracy per epoch; a star marks the best epoch, the one each model was "
                         "restored to.", _curves(c.rows, "val_accuracy", "Validation accuracy")),
        "val_loss": ("Validation loss per epoch (lower is better); early stopping and best-epoch restore use it.",
                     _curves(c.rows, "val_loss", "Validation loss")),
        "train_vs_val": ("Training vs validation, per strategy: a widening gap is overfitting."
                         + (" Dotted line: the next stage unfreezes blocks." if staged else ""), _train_vs_val(c.rows)),
        "confusion": ("Confusion matrices on the validation set (rows: true class, columns: predicted).",
                      _confusions(c.rows, c.splits.classes)),
        "roc": (f"ROC curves on the validation set{averaged}; on the right, the corner where they differ.",
                _roc(c.rows, c.val_probs, labels, classes)),
        "accuracy_vs_time": ("Validation accuracy against training time: up and to the left is better."
                             + _shared_features(c.rows), _accuracy_vs_time(c.rows)),
        "blocks": ("Which blocks each strategy trains (green) and keeps frozen (grey), per stage.",
                   _blocks(c.rows, c.blocks)),
    }
    pick = _sample(labels, GRADCAM_IMAGES, c.config.seed)
    figures["gradcam"] = (
        "Grad-CAM on a few validation images: where each strategy's model looks for the class it predicts "
        "(red = strongest). Green title: right, red: wrong.", _gradcam_grid(c, pick))
    wrong = np.flatnonzero(c.val_probs[best].argmax(1) != labels)
    if len(wrong):
        figures["mistakes"] = (
            f"Validation images that {best} (the best model) gets wrong, most confident first, each beside its "
            "Grad-CAM.",
            _mistakes(c, wrong))
    return figures


def _shared_features(rows: list[dict]) -> str:
    """Which strategies paid for the frozen-prefix features that others then read, when some did."""
    computed = [r["strategy"] for r in rows if r["features_computed"]]
    readers = [r["strategy"] for r in rows if not r["features_computed"] and any(s["frozen"] for s in r["stages"])]
    if not computed or not readers:
        return ""
    return (f" The time of {', '.join(computed)} includes computing frozen-prefix features that "
            f"{', '.join(readers)} then read from the cache.")


def _curves(rows: list[dict], key: str, title: str) -> Figure:
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(rows):  # earlier curves wider, so one that coincides with a later one still shows
        color, wide = COLORS[r["strategy"]], len(rows) - i
        ax.plot([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]], "-", marker=MARKERS[r["strategy"]],
                lw=0.6 + 0.6 * wide, ms=2.5 + 1.5 * wide, color=color, label=r["strategy"])
        best = r["history"][r["best_epoch"] - 1]
        ax.plot(best["epoch"], best[key], "*", ms=16, color=color, mec="black", mew=0.8)
    ax.set(title=f"{title} per epoch", xlabel="epoch", ylabel=title.lower())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if "accuracy" in key:
        ax.yaxis.set_major_formatter(PERCENT)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _train_vs_val(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 2.4 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, pair in zip(rows, axes):
        history = r["history"]
        epochs = [h["epoch"] for h in history]
        unfreeze = [h["epoch"] - 0.5 for prev, h in zip(history, history[1:]) if h["stage"] != prev["stage"]]
        for ax, metric in zip(pair, ("accuracy", "loss")):
            ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o--", ms=3, color="tab:gray", label="train")
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", ms=3, color=COLORS[r["strategy"]],
                    label="validation")
            for x in unfreeze:
                ax.axvline(x, ls=":", color="black")
            ax.set_title(f"{r['strategy']}: {metric}", fontsize=10)
            if metric == "accuracy":
                ax.yaxis.set_major_formatter(PERCENT)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def _confusions(rows: list[dict], classes: list[str]) -> Figure:
    fig, axes = _grid(len(rows), -(-len(rows) // -(-len(rows) // 4)), (3.6, 3.4))  # at most 4 a row, rows even
    for r, ax in zip(rows, axes):
        m = np.array(r["val_confusion_matrix"])
        ax.imshow(m, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=11,
                    color="white" if v > m.max() / 2 else "black")
        ticks = range(len(classes))
        slanted = len(classes) > 3
        ax.set_xticks(ticks, classes, rotation=45 if slanted else 0, ha="right" if slanted else "center")
        ax.set_yticks(ticks, classes)
        ax.set(xlabel="predicted", ylabel="true", title=f"{r['strategy']}: {_pct(r['val_accuracy'])}")
    return fig


def _roc(rows: list[dict], probs: dict[str, np.ndarray], labels: np.ndarray, classes: int) -> Figure:
    """Binary: the second class is positive. Multi-class: one-vs-rest, micro-averaged. The right panel zooms
    into the corner where good models differ: from the lowest true positive rate before any false positive to
    the false positive rate at which the last curve finds every positive."""
    curves = {}
    for r in rows:
        p = probs[r["strategy"]]
        truth, score = (labels, p[:, 1]) if classes == 2 else (np.eye(classes)[labels].ravel(), p.ravel())
        curves[r["strategy"]] = skm.roc_curve(truth, score)[:2]
    width = max(0.01, max(fpr[np.argmax(tpr >= 1)] for fpr, tpr in curves.values()))
    height = max(0.01, 1 - min(tpr[fpr == 0].max() for fpr, tpr in curves.values()))
    fig = Figure(figsize=(11, 5), layout="constrained")
    whole, corner = fig.subplots(1, 2)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        for ax in (whole, corner):
            ax.plot(fpr, tpr, color=COLORS[name], lw=0.8 + 0.7 * (len(curves) - i),
                    label=f"{name} (AUC {skm.auc(fpr, tpr):.4f})")
    whole.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    averaged = "" if classes == 2 else " (one-vs-rest, micro-averaged)"
    whole.set(title=f"ROC on the validation set{averaged}", xlabel="false positive rate", ylabel="true positive rate")
    corner.set(title="Zoom on the top-left corner", xlabel="false positive rate",
               xlim=(-0.05 * width, 1.1 * width), ylim=(1 - 1.15 * height, 1 + 0.05 * height))
    corner.legend(loc="lower right")
    for ax in (whole, corner):
        ax.grid(alpha=0.3)
    return fig


def _accuracy_vs_time(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r["train_seconds"], r["val_accuracy"], s=110, color=COLORS[r["strategy"]], edgecolor="black",
                   marker=MARKERS[r["strategy"]], label=r["strategy"])
    seconds = [r["train_seconds"] for r in rows]
    if max(seconds) > 20 * min(seconds):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.yaxis.set_major_formatter(PERCENT)
    ax.margins(x=0.15, y=0.2)
    ax.set_ylim(top=min(ax.get_ylim()[1], 1.005))
    ax.legend()
    ax.set(title="Accuracy vs training time", xlabel="training time (s)", ylabel="validation accuracy")
    ax.grid(alpha=0.3)
    return fig


def _blocks(rows: list[dict], blocks: list[str]) -> Figure:
    lines = [(r["strategy"] + (f" · stage {i}" if len(r["stages"]) > 1 else "")
              + (" (random init)" if r["weights"].startswith("none") else ""), s)
             for r in rows for i, s in enumerate(r["stages"], 1)]
    trained = np.array([[i >= s["frozen"] for i in range(len(blocks))] + [True] for _, s in lines])
    fig = Figure(figsize=(max(7.0, 0.55 * len(blocks) + 3), 0.45 * len(lines) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(trained, cmap=ListedColormap(["#d9d9d9", "#2ca02c"]), vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(blocks) + 1), blocks + ["head"], rotation=45, ha="right")
    ax.set_yticks(range(len(lines)), [name for name, _ in lines])
    ax.set_xticks(np.arange(-0.5, len(blocks) + 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(lines)), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="both", length=0)
    ax.set_title("Blocks trained per strategy (input on the left)")
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
    return [i for group in itertools.zip_longest(*by_class) for i in group if i is not None][:count]


def _images(c: Comparison, indices) -> torch.Tensor:
    """The validation images as the models see them: resized, centre-cropped, uint8."""
    dataset = ImageDataset(c.splits.val.subset(indices), c.preprocessing)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _show(ax, image: torch.Tensor, cam: np.ndarray | None, title: str, color: str = "black") -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9, color=color)
    ax.set_axis_off()


def _gradcam_grid(c: Comparison, indices: list[int]) -> Figure:
    images, classes = _images(c, indices), c.splits.classes
    truth = [c.splits.val.labels[i] for i in indices]
    fig = Figure(figsize=(2.1 * (len(c.runs) + 1), 2.25 * len(indices)), layout="constrained")
    axes = fig.subplots(len(indices), len(c.runs) + 1, squeeze=False)
    for row, (image, label) in enumerate(zip(images, truth)):
        _show(axes[row][0], image, None, ("image\n" if row == 0 else "") + f"true: {classes[label]}")
    for col, (name, run) in enumerate(c.runs.items(), 1):
        cams, probs = grad_cam(run.model, images)
        for row, (cam, p, label) in enumerate(zip(cams, probs, truth)):
            k = int(p.argmax())
            _show(axes[row][col], images[row], cam, (f"{name}\n" if row == 0 else "") + f"{classes[k]} {p[k]:.2f}",
                  "tab:green" if k == label else "tab:red")
    return fig


def _mistakes(c: Comparison, wrong: np.ndarray) -> Figure:
    """Each wrong image twice: as it is (is the label right?) and with the best model's Grad-CAM."""
    best, classes = c.best["strategy"], c.splits.classes
    probs = c.val_probs[best]
    shown = wrong[np.argsort(-probs[wrong].max(1))][:MISTAKES_SHOWN].tolist()
    images = _images(c, shown)
    cams, _ = grad_cam(c.runs[best].model, images)
    fig, axes = _grid(2 * len(shown), 6, (2.1, 2.3))
    for plain, overlay, i, image, cam in zip(axes[::2], axes[1::2], shown, images, cams):
        k = int(probs[i].argmax())
        truth = classes[c.splits.val.labels[i]]
        _show(plain, image, None, f"true {truth}\n→ {classes[k]} {probs[i][k]:.2f}", "tab:red")
        _show(overlay, image, cam, "\nGrad-CAM")
    most = f", the {len(shown)} most confident shown" if len(shown) < len(wrong) else ""
    fig.suptitle(f"{best} gets {len(wrong)} of {len(probs)} validation images wrong{most}")
    return fig
