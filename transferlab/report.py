"""The comparison report: the recommendation, results and curves first, set-up last; one list of sections rendered
twice, as self-contained HTML (every image inlined as a data URI, so it opens offline and can be mailed) and as
Markdown beside the PNGs.

Figures use matplotlib's object API (no pyplot): no global backend or state, no display needed. Every observation
is a sentence filled from this comparison's numbers and the statistics of `studies`.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from .runs import write_atomic
from .studies import Analysis, Paired, Summary, analyse, largest, ranked, wilson

PERCENT = FuncFormatter(lambda x, _: f"{100 * x:.4g}%")  # 99.25%, 99.5%, 100%: no more digits than needed
MIN_SPAN_IMAGES = 20  # an accuracy axis spans at least this many images' worth, so one image is never a cliff
GRADCAM_COLUMNS = 6
MISTAKES_SHOWN = 12
MANY_CLASSES = 5  # from here on, one large confusion matrix of the best model instead of one per configuration


@dataclass
class Section:
    title: str
    points: list[str] = field(default_factory=list)
    table: list[list[str]] | None = None  # first row is the header
    figures: list[str] = field(default_factory=list)  # names of plots/<name>.png
    collapsed: bool = False  # HTML: folded away until clicked
    tables: list[tuple[str, list[list[str]]]] = field(default_factory=list)  # further (caption, table) pairs


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


def write(c: Comparison) -> None:
    """plots/*.png, report.html and report.md in the comparison's folder."""
    v = View.of(c)
    figures = _figures(v)
    pngs = {}
    (c.out / "plots").mkdir(parents=True, exist_ok=True)
    for name, (_, fig) in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        pngs[name] = buffer.getvalue()
        write_atomic(c.out / "plots" / f"{name}.png", pngs[name])
    captions = {name: caption for name, (caption, _) in figures.items()}
    title = f"Fine-tuning compared: {c.config.backbone} on {c.splits.train.root}"
    sections = _sections(v, list(figures))
    write_atomic(c.out / "report.html", render_html(title, sections, captions, pngs))
    write_atomic(c.out / "report.md", render_markdown(title, sections, captions))


# ---------------------------------------------------------------- numbers as words


def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 or x == 0 else f"{100 * x:.2g}%"  # 0.038%, not 0.0%


def _many(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _seconds(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.2g} s"


def _times(x: float) -> str:
    return f"{x:.1f}×" if x < 100 else f"{x:,.0f}×"


def _p(p: float) -> str:
    return f"p = {p:.2g}"


def _interval(lo_hi: Sequence[float]) -> str:
    return f"{_pct(lo_hi[0])}–{_pct(lo_hi[1])}"


def size_label(size: str, images: int | None = None) -> str:
    """A training size as a phrase: '50 images per class', '25% of each class', 'all 1,600 training images'."""
    if size == "all":
        return f"all {images:,} training images" if images else "all training images"
    return f"{float(size):.0%} of each class" if "." in size else f"{size} images per class"


def compare_images(winner: str, other: str, paired: Paired, seeds: int, images: str = "validation image") -> str:
    """A clause on two configurations image by image, whatever the numbers: identical, one way or both ways, with
    what the paired test says when they differ."""
    if not paired.wins + paired.losses:
        return (f"both got exactly the same {images}s right" if seeds == 1 else
                f"both were right equally often on every {images}")
    if seeds == 1:
        found = (f"{winner} was right on {_many(paired.wins, images)} that {other} got wrong and wrong on "
                 f"{paired.losses:,} that it got right (exact McNemar {_p(paired.p)})")
    else:
        found = (f"{winner} was right more often on {_many(paired.wins, images)} and less often on "
                 f"{paired.losses:,} than {other} (sign test over {seeds} seeds, {_p(paired.p)})")
    return found + (", unlikely to be chance" if paired.separable else
                    ", within what chance gives, so the data cannot separate them")


def _gain(x: float) -> str:
    return _points(x) if x > 0 else "no more accuracy" if x == 0 else f"{_points(x)} (worse)"


# ---------------------------------------------------------------- what the report says


def recommendation_notes(v: View) -> list[str]:
    """The report's first lines: what to use on this data, how sure, and what more would buy."""
    rec, groups = v.analysis.recommendation, v.analysis.summaries
    over = f" (mean of {rec.seeds} seeds)" if rec.seeds > 1 else ""
    at = f" with {size_label(rec.train_size, v.main[0].train_images)}" if len(v.sizes) > 1 else ""
    notes = [f"Recommended for this data{at}: {rec.configuration}, the cheapest configuration whose validation "
             f"accuracy is not significantly below the best. Its {rec.scored_on} accuracy is {_pct(rec.accuracy)}"
             f"{over}, 95% interval {_interval(rec.interval)} (Wilson, {rec.images:,} images)."]
    if rec.versus_best is None:
        notes.append("It is also the most accurate configuration on the validation images."
                     if len(largest(groups)) > 1 else "It is the only configuration trained.")
    else:
        gain = (f"scored {_points(rec.gain_of_best)} on validation" if rec.gain_of_best > 0 else
                "scored the same validation accuracy with a lower loss")
        notes.append(f"The most accurate, {rec.best}, {gain}: "
                     f"{compare_images(rec.best, rec.configuration, rec.versus_best, rec.seeds)}.")
    if rec.costlier:
        notes.append("What costlier configurations would buy over it in validation accuracy: " + "; ".join(
            f"{o.configuration}: {_gain(o.gain)} for {_times(o.times)} the epochs' time ({_seconds(o.fit_seconds)}"
            + (f", {_p(o.paired.p)})" if o.paired.wins + o.paired.losses else ")") for o in rec.costlier) + ".")
    return notes + curve_notes(v) + [f"{f.name} failed and is left out: {f.error}." for f in v.c.failures]


def curve_notes(v: View) -> list[str]:
    """The learning curve's verdict, from the numbers at every training size."""
    curve = v.analysis.curve
    if curve is None:
        return []
    steps = "; ".join(f"{size_label(s.train_size, s.train_images)}: {s.fine_tuning} {_pct(s.fine_tuned)} vs "
                      f"{_pct(s.feature_extraction)} ({_p(s.paired.p)})" for s in curve.steps)
    since = curve.from_size
    if since is None:
        beaten = [s for s in curve.steps if s.beat]
        lead = ("Fine-tuning did not beat feature extraction by more than noise at the largest training size"
                + (f", though it did at {', '.join(size_label(s.train_size) for s in beaten)}" if beaten else
                   " or any smaller one"))
    elif since == curve.steps[0].train_size:
        lead = "Fine-tuning beat feature extraction by more than noise at every training size tried"
    else:
        lead = (f"Fine-tuning beat feature extraction by more than noise from {size_label(since)} on; with fewer "
                "images the difference was within noise")
    return [f"{lead} (best fine-tuned configuration against feature extraction, validation accuracy: {steps})."]


def observations(v: View) -> list[str]:
    """Which configuration scored highest and whether the data can tell, the overfitting gap, what each cost."""
    top = ranked(largest(v.analysis.summaries))
    return _accuracy_notes(v, top) + [_gap_note(top)] + _cost_notes(v, top)


def _accuracy(s: Summary) -> str:
    a = s.val_accuracy
    return f"{s.configuration} {_pct(a.mean)}" + (f" ± {100 * a.std:.1f}" if len(s.rows) > 1 else "")


def _accuracy_notes(v: View, top: list[Summary]) -> list[str]:
    seeds = v.seeds
    over = f" (mean ± standard deviation over {seeds} seeds)" if seeds > 1 else ""
    notes = [f"Validation accuracy{over}: " + ", ".join(_accuracy(s) for s in top) + "."]
    if len(top) > 1:
        best, second = top[0], top[1]
        paired = Paired.test(best.right(v.labels), second.right(v.labels))
        margin = best.val_accuracy.mean - second.val_accuracy.mean
        images = compare_images(best.configuration, second.configuration, paired, seeds)
        if margin > 0:
            notes.append(f"{best.configuration} scored highest, {_points(margin)} ahead of {second.configuration}: "
                         f"{images}.")
        else:
            loss = (f"{best.configuration} ranks first on its lower validation loss ({best.val_loss.mean:.4f} vs "
                    f"{second.val_loss.mean:.4f})" if best.val_loss.mean < second.val_loss.mean else
                    f"their validation losses are equal too, so {best.configuration} ranks first only by order")
            notes.append(f"{best.configuration} and {second.configuration} tied on validation accuracy "
                         f"({_pct(best.val_accuracy.mean)}): {images}; {loss}.")
    lowest = min(top, key=lambda s: s.val_loss.mean)
    if lowest is not top[0] and lowest.val_loss.mean < top[0].val_loss.mean:
        notes.append(f"The lowest validation loss is {lowest.configuration}'s ({lowest.val_loss.mean:.4f}; "
                     f"{top[0].configuration}: {top[0].val_loss.mean:.4f}).")
    if v.c.splits.test:
        n = len(v.c.splits.test)
        by_test = sorted(top, key=lambda s: -s.test_accuracy.mean)
        leaders = [s for s in by_test if s.test_accuracy.mean == by_test[0].test_accuracy.mean]
        if len(top) == 1:
            where = ""
        elif top[0] in leaders:
            where = f"; {top[0].configuration} is {'joint ' if len(leaders) > 1 else ''}best there too"
        else:
            names = " and ".join(s.configuration for s in leaders)
            where = f"; {names} {'leads' if len(leaders) == 1 else 'lead'} there"
        notes.append(f"Test accuracy ({n:,} images, 95% Wilson intervals): " + ", ".join(
            f"{s.configuration} {_pct(s.test_accuracy.mean)} ({_interval(wilson(s.test_accuracy.mean, n))})"
            for s in by_test) + f"{where}.")
    return notes


def _gap_note(top: list[Summary]) -> str:
    gaps = {s.configuration: s.gap for s in top}
    widest = f"; widest: {max(gaps, key=gaps.get)}" if len(set(gaps.values())) > 1 else ""
    negative = (" A negative gap means training accuracy, measured with dropout (and augmentation) on, trailed "
                "validation." if min(gaps.values()) < 0 else "")
    return ("Overfitting gap, training minus validation accuracy: "
            + ", ".join(f"{name} {_points(g)}" for name, g in gaps.items()) + f"{widest}.{negative}")


def _cost_notes(v: View, top: list[Summary]) -> list[str]:
    by_time = sorted(top, key=lambda s: s.fit_seconds.mean)
    fastest, best = by_time[0], top[0]

    def times(s: Summary) -> str:
        return _times(s.fit_seconds.mean / max(fastest.fit_seconds.mean, 1e-9))

    notes = [f"Training time of the epochs: {fastest.configuration} {_seconds(fastest.fit_seconds.mean)}"
             + (" (fastest)" if len(top) > 1 else "") + "".join(
                 f"; {s.configuration} {_seconds(s.fit_seconds.mean)} ({times(s)})" for s in by_time[1:]) + "."]
    if fastest is not best:
        paired = Paired.test(best.right(v.labels), fastest.right(v.labels))
        gain = best.val_accuracy.mean - fastest.val_accuracy.mean
        bought = f"gained {_points(gain)} over" if gain > 0 else "gained no validation accuracy over"
        said = fastest is top[1]  # the accuracy notes compared these two already
        clause = "" if said else ": " + compare_images(best.configuration, fastest.configuration, paired, v.seeds)
        notes.append(f"{best.configuration} {bought} {fastest.configuration} for {times(best)} its epochs' time"
                     f"{clause}.")
    main = v.main
    computed = [f"{r.name} {r.features_computed}" for r in v.c.rows if r.features_computed]
    if computed:
        listed = ", ".join(computed[:6]) + (f" and {len(computed) - 6} more points" if len(computed) > 6 else "")
        notes.append(f"The frozen-prefix features were computed once for the whole comparison, "
                     f"{_many(v.c.features_computed, 'array')} in all (by {listed}); every other point read them from "
                     "the shared cache. Total times include that work, the epochs' times do not.")
    elif v.c.config.cache and any(s.frozen for r in main for s in r.stages):
        notes.append("Every frozen-prefix feature array came from the feature cache, filled by an earlier run: the "
                     "times of configurations with frozen blocks do not include running those blocks once.")
    notes.append("Trainable parameters: " + ", ".join(
        f"{r.configuration} {r.trainable_params:,} ({_pct(r.trainable_params / r.total_params)})" for r in main) + ".")
    still = [r.configuration for r in main if r.best_epoch == r.epochs_run]
    if still:
        notes.append(f"Validation loss was still falling at the last epoch for {', '.join(still)}: "
                     "more epochs may help.")
    stopped = [f"{r.configuration} after epoch {r.epochs_run} (best {r.best_epoch})" for r in main
               if r.epochs_run < sum(s.epochs for s in r.stages)]
    if stopped:
        notes.append("Early stopping ended " + ", ".join(stopped) + ".")
    return notes


def summary_table(v: View) -> list[list[str]]:
    """One row per configuration and training size: mean (± standard deviation over seeds) of what matters;
    accuracies in percent."""
    seeds, sizes, test = v.seeds > 1, len(v.sizes) > 1, v.c.splits.test is not None
    ks = sorted(v.main[0].val.top_k)

    def spread(s: Summary, value, scale: float = 100, digits: int = 1) -> str:
        x = s.spread(value)
        return f"{scale * x.mean:.{digits}f}" + (f" ± {scale * x.std:.{digits}f}" if len(s.rows) > 1 else "")

    header = (["configuration"] + ["train images"] * sizes + ["seeds"] * seeds
              + ["blocks", "trainable", "train acc %", "val acc %", "val loss", "val F1 %"]
              + [f"val top-{k} %" for k in ks] + ["test acc %", "test 95% CI"] * test + ["epochs' s", "total s"])
    rows = [header]
    for s in v.analysis.summaries:
        r = s.first
        rows.append([s.configuration] + [f"{r.train_images:,}"] * sizes + [str(len(s.rows))] * seeds
                    + [str(r.blocks_trained), f"{r.trainable_params:,}", spread(s, lambda r: r.train_accuracy),
                       spread(s, lambda r: r.val.accuracy), spread(s, lambda r: r.val.loss, 1, 4),
                       spread(s, lambda r: r.val.f1)] + [spread(s, lambda r, k=k: r.val.top_k[k]) for k in ks]
                    + ([spread(s, lambda r: r.test.accuracy), _interval(wilson(s.test_accuracy.mean,
                                                                               len(v.c.splits.test)))] if test else [])
                    + [f"{s.fit_seconds.mean:.1f}", f"{s.train_seconds.mean:.1f}"])
    return rows


def _points_table(rows: list[Row]) -> list[list[str]]:
    """Every point, one line each, as comparison.csv has them."""
    flat = [r.flat() for r in rows]
    columns = [k for k in flat[0] if k not in ("configuration", "strategy")]

    def cell(x) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)

    return [[k.replace("_", " ") for k in columns]] + [[cell(f.get(k)) for k in columns] for f in flat]


def per_class_table(v: View) -> list[list[str]]:
    """The best model's precision, recall and F1 per class, and what each class is most often taken for."""
    pred = v.best.val_probs.argmax(1)
    k = len(v.classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(v.labels, pred, labels=range(k),
                                                                         zero_division=0)
    m = np.array(v.best.val.confusion)
    rows = [["class", "images", "precision", "recall", "F1", "most often taken for"]]
    for i, name in enumerate(v.classes):
        off = m[i].copy()
        off[i] = 0
        taken = f"{v.classes[off.argmax()]} ({off.max()})" if off.max() else "-"
        rows.append([name, f"{support[i]:,}", f"{precision[i]:.3f}", f"{recall[i]:.3f}", f"{f1[i]:.3f}", taken])
    return rows


def confused_pairs(v: View, count: int = 8) -> list[list[str]]:
    """The best model's most frequent confusions, true class -> predicted class."""
    m = np.array(v.best.val.confusion)
    pairs = sorted(((m[i, j], i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j]), reverse=True)
    return [["true class", "taken for", "images", "share of the true class"]] + [
        [v.classes[i], v.classes[j], str(n), _pct(n / m[i].sum())] for n, i, j in pairs[:count]]


def _sections(v: View, figures: list[str]) -> list[Section]:
    def present(*names: str) -> list[str]:
        return [n for n in names if n in figures]

    c = v.c
    stages = [["configuration", "stage", "trains", "max epochs", "head lr", "backbone lr"]] + [
        [r.configuration, str(i), _trains(c.blocks, s.frozen), str(s.epochs), f"{s.head_lr:g}",
         f"{s.backbone_lr:g}" if s.frozen < len(c.blocks) else "-"] for r in v.main for i, s in enumerate(r.stages, 1)]
    flawless = [] if "mistakes" in figures else [
        f"{v.best.configuration} (the best model) gets all {len(c.splits.val):,} validation images right, so there "
        "is no gallery of its mistakes."]
    many = len(v.classes) > 2
    pairs = confused_pairs(v)
    results_note = ("train acc: running accuracy during the best epoch (dropout and augmentation on). val and test: "
                    "the restored best model. epochs' s: training epochs with their validation passes; total s: "
                    "the whole run here, including any frozen-prefix features it computed for the others."
                    + (" Mean ± standard deviation over seeds." if v.seeds > 1 else ""))
    sections = [
        Section("Recommendation", recommendation_notes(v)),
        Section("Results", [results_note], table=summary_table(v)),
        Section("Observations", observations(v)),
        Section("Depth: how many blocks to train", figures=present("depth")),
        Section("Learning curves: accuracy against training images", figures=present("learning_curve")),
        Section("Training curves", figures=present("val_accuracy", "val_loss", "train_vs_val")),
        Section(f"Classes: {v.best.configuration}, the best model, on the validation images",
                table=per_class_table(v) if many else None,
                tables=[("Most confused pairs", pairs)] if len(pairs) > 1 else [],
                figures=present("confusion", "roc")),
        Section("Cost", table=stages, figures=present("accuracy_vs_time", "blocks")),
        Section("Where the models look (Grad-CAM)", flawless, figures=present("gradcam", "mistakes")),
    ]
    if len(c.rows) > len(v.analysis.summaries):
        sections.append(Section(f"Every run ({len(c.rows)})", table=_points_table(c.rows), collapsed=True))
    return [s for s in sections if s.points or s.table or s.figures] + [
        Section("Set-up", table=[["", ""]] + _setup(v), collapsed=True)]


def _trains(blocks: list[str], frozen: int) -> str:
    names = blocks[frozen:]
    return " + ".join(([f"all {len(blocks)} blocks"] if frozen == 0 else names) + ["head"])


def _setup(v: View) -> list[list[str]]:
    """Every setting as the runs used it: values, never 'default'."""
    c, cfg, s = v.c, v.c.config, v.c.splits
    summary = s.summary()
    skipped, duplicates = summary["skipped"], summary["duplicates"]
    pre = c.preprocessing
    stages = [st for r in v.main for st in r.stages]
    sources: dict[str, list[str]] = {}
    for r in v.main:
        sources.setdefault(r.weights, []).append(r.configuration)
    val_from = (f"folder {s.val.root}" if s.val.root != s.train.root
                else f"{cfg.val_split:.0%} of the training folder, stratified, seed {cfg.seed}")
    two_stage = [st.epochs for r in v.main if len(r.stages) > 1 for st in r.stages[:1]]
    backbone_lrs = sorted({st.backbone_lr for st in stages if st.frozen < len(c.blocks)})
    device = c.device

    def counts(images) -> str:
        return f"{len(images):,} (" + ", ".join(f"{k} {n:,}" for k, n in images.counts().items()) + ")"

    sweep = c.sweep
    return [
        ["training images", f"{counts(s.train)} from {s.train.root}"],
        *([["training sizes", ", ".join(size_label(x) for x in sweep.sizes) + f": nested, class-balanced subsets "
            f"(seed {cfg.seed})"]] if len(sweep.sizes) > 1 else []),
        ["validation images", f"{counts(s.val)}, {val_from}"],
        *([["test images", f"{counts(s.test)} from {s.test.root}"]] if s.test else []),
        ["skipped files", f"{len(skipped)}" + "".join(f"; {x['split']}: {x['path']} ({x['reason']})"
                                                      for x in skipped[:10])
         + (f"; {len(skipped) - 10} more in comparison.json" if len(skipped) > 10 else "")],
        ["duplicates across splits", f"{len(duplicates)}" + "".join(f"; {d['a']} = {d['b']}" for d in duplicates[:5])],
        ["backbone", f"{cfg.backbone}: {len(c.blocks)} blocks ({', '.join(c.blocks)})"],
        ["weights", "; ".join(f"{src}: {', '.join(names)}" for src, names in sources.items())],
        ["input", f"{pre.size} px (short side resized to {pre.resize}, {pre.interpolation}, centre crop), "
                  f"mean {_floats(pre.mean)}, std {_floats(pre.std)}"],
        ["seeds", (", ".join(map(str, sweep.seeds)) + " (initialisation, order and augmentation; the split and "
                   f"subsets use seed {cfg.seed})") if sweep.seeds else str(cfg.seed)],
        ["epochs", f"{cfg.epochs} at most" + (f"; two-stage head epochs {two_stage[0]}" if two_stage else "")],
        ["early stopping", f"after {cfg.patience} epochs without a lower validation loss" if cfg.patience else "off"],
        ["batch size", str(cfg.batch_size)],
        ["augmentation", cfg.augment + (f", {cfg.cache_views} cached views per image"
                                        if cfg.augment != "none" and cfg.cache else "")],
        ["head", f"{cfg.head}, dropout {cfg.dropout:g}"],
        ["learning rates (AdamW)", f"head {', '.join(f'{x:g}' for x in sorted({st.head_lr for st in stages}))}"
         + (f"; trained blocks {', '.join(f'{x:g}' for x in backbone_lrs)}" if backbone_lrs else "")
         + (f", times {cfg.lr_decay:g} per block further down" if cfg.lr_decay != 1 else "")],
        ["BatchNorm in trained blocks", "updates its statistics" if cfg.train_bn else "inference mode (frozen statistics)"],
        ["frozen-prefix cache", "on" if cfg.cache else "off"],
        ["device", f"{device['name']} ({device['device']}); autocast {device['amp']}, channels_last "
                   f"{_on(device['channels_last'])}, folded BatchNorm {_on(device['fold_bn'])}, GPU decoding "
                   f"{_on(device['gpu_decode'])}, {device['workers']} decoding workers; torch {device['torch']}"],
    ]


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


# ---------------------------------------------------------------- rendering


def _cell(tag: str, text: str, numbers_right: bool) -> str:
    align = ' class="n"' if numbers_right and re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?%?( ± [\d.]+)?", text) else ""
    return f"<{tag}{align}>{html.escape(text)}</{tag}>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}.wide{overflow-x:auto}table{border-collapse:collapse;margin:.8em 0;
font-size:.88em}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}caption{text-align:left;font-weight:600;padding:.3em 0}
.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}figure{margin:1.5em 0}img{max-width:100%}
figcaption{color:#555;font-size:.95em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
summary h2{display:inline;border:none}summary{cursor:pointer;margin-top:1.6em}"""


def _html_table(table: list[list[str]], caption: str = "") -> str:
    head, *body = table
    numeric = any(head)  # a key/value table (no header) reads better left-aligned
    header = "<tr>" + "".join(_cell("th", h, numeric) for h in head) + "</tr>" if numeric else ""
    return ("<div class='wide'><table>" + (f"<caption>{html.escape(caption)}</caption>" if caption else "") + header
            + "".join("<tr>" + "".join(_cell("td", c, numeric) for c in row) + "</tr>" for row in body)
            + "</table></div>")


def render_html(title: str, sections: list[Section], captions: dict[str, str], pngs: dict[str, bytes]) -> str:
    """One file with every image inside it as a base64 data URI; collapsed sections fold away."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        heading = f"<h2>{html.escape(s.title)}</h2>"
        parts.append(f"<details><summary>{heading}</summary>" if s.collapsed else heading)
        if s.points:
            parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in s.points) + "</ul>")
        if s.table:
            parts.append(_html_table(s.table))
        parts += [_html_table(t, caption) for caption, t in s.tables]
        for name in s.figures:
            data = base64.b64encode(pngs[name]).decode()
            parts.append(f"<figure><img alt='{html.escape(captions[name])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
        if s.collapsed:
            parts.append("</details>")
    return "\n".join(parts + ["</body></html>"])


def render_markdown(title: str, sections: list[Section], captions: dict[str, str]) -> str:
    """The same report, with the images as plots/<name>.png beside it."""
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def table(t: list[list[str]]) -> list[str]:
        return ["", row(t[0]), row(["---"] * len(t[0]))] + [row(r) for r in t[1:]]

    lines = [f"# {title}"]
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        lines += [f"- {p}" for p in s.points]
        if s.table:
            lines += table(s.table)
        for caption, t in s.tables:
            lines += ["", f"**{caption}**"] + table(t)
        for name in s.figures:
            lines += ["", f"![{captions[name]}](plots/{name}.png)", "", f"*{captions[name]}*"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


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


def _figures(v: View) -> dict[str, tuple[str, Figure]]:
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
                f"{v.best.configuration}: {_pct(v.best.val.accuracy)} right")
        return fig
    rows = v.main
    fig, axes = _grid(len(rows), -(-len(rows) // -(-len(rows) // 4)), (3.6, 3.4))  # at most 4 a row, rows even
    for r, ax in zip(rows, axes):
        _matrix(ax, np.array(r.val.confusion), classes, f"{r.configuration}: {_pct(r.val.accuracy)}")
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
