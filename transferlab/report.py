"""The comparison report: the recommendation, results and curves first, set-up last; one list of sections rendered
twice, as self-contained HTML (every image inlined as a data URI, so it opens offline and can be mailed) and as
Markdown beside the PNGs (`plots` draws them).

Every observation is a sentence filled from this comparison's numbers and the statistics of `studies`, whatever
those numbers are: ties, wins, losses and a single configuration all read as sentences.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn import metrics as skm

from . import distributed
from .comparison import Comparison, Row
from .plots import View, figures
from .runs import write_atomic
from .studies import Paired, Summary, largest, ranked, wilson


@dataclass
class Section:
    title: str
    points: list[str] = field(default_factory=list)
    table: list[list[str]] | None = None  # first row is the header
    figures: list[str] = field(default_factory=list)  # names of plots/<name>.png
    collapsed: bool = False  # HTML: folded away until clicked
    tables: list[tuple[str, list[list[str]]]] = field(default_factory=list)  # further (caption, table) pairs


@distributed.main_only
def write(c: Comparison) -> None:
    """plots/*.png, report.html and report.md in the comparison's folder."""
    v = View.of(c)
    drawn = figures(v)
    pngs = {}
    (c.out / "plots").mkdir(parents=True, exist_ok=True)
    for name, (_, fig) in drawn.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        pngs[name] = buffer.getvalue()
        write_atomic(c.out / "plots" / f"{name}.png", pngs[name])
    captions = {name: caption for name, (caption, _) in drawn.items()}
    title = f"Fine-tuning compared: {c.config.backbone} on {c.config.data}"  # the data as the user named it
    sections = _sections(v, list(drawn))
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
                  f"{'BGR, ' if pre.channels == 'BGR' else ''}mean {_floats(pre.mean)}, std {_floats(pre.std)}"],
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
