"""Studies (issue 12): depth sweeps, learning curves and seeds on one split and one feature store; intervals,
paired tests, the recommendation; every observation a sentence whatever the numbers; many classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import transferlab as tl
from transferlab import plots, report
from transferlab.comparison import Comparison, Row, Scores, Sweep
from transferlab.data import ImageSet
from transferlab.errors import TransferlabError
from transferlab.plots import View
from transferlab.splits import Splits
from transferlab.strategies import Stage
from transferlab.studies import Paired, nested_subsets, plan, sweep, wilson

from .conftest import TINY, make_folder

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Comparison:
    """Feature extraction and partial-1, on 3 and on all training images per class, with seeds 0 and 1: 8 points
    on three classes, scored on a validation and a test folder."""
    root = tmp_path_factory.mktemp("study")
    make_folder(root / "train", CLASSES, per_class=8)
    make_folder(root / "val", CLASSES, per_class=4, seed=1)
    make_folder(root / "test", CLASSES, per_class=3, seed=2)
    return tl.compare(root / "train", None, root / "out", val=str(root / "val"), test=root / "test",
                      unfreeze_blocks="0,1", train_sizes=[3, "all"], seeds="0,1", cache_dir=str(root / "cache"),
                      **TINY)


def test_one_point_per_depth_size_and_seed_on_one_split(study):
    assert [r.name for r in study.rows] == [f"{c}_{s}_seed{k}" for c in ("feature-extraction", "partial-1")
                                            for s in ("n3", "all") for k in (0, 1)]
    assert {r.train_images for r in study.rows} == {9, 24} and {r.seed for r in study.rows} == {0, 1}
    splits = {tuple(row["path"] for row in tl.load(study.out / r.name).split if row["split"] == "val")
              for r in study.rows}
    assert len(splits) == 1  # the validation images never change
    seeds = [r.val_probs for r in study.rows if r.configuration == "partial-1" and r.train_size == "all"]
    assert not np.allclose(*seeds)  # the seed changes initialisation and order


def test_every_point_reads_one_set_of_frozen_prefix_features(study):
    """Two prefixes (all blocks, all but the last) for train, validation and test: six arrays per backbone, however
    many training sizes; with a random-init backbone (weights none) each seed is another backbone, so twelve."""
    assert study.features_computed == 12
    doc = json.loads((study.out / "comparison.json").read_text())
    assert doc["features_computed"] == 12 and sum(p["features_computed"] for p in doc["points"]) == 12
    assert sum(r.features_computed for r in study.rows if r.train_size == "all") == 0  # they read the subsets' work


def test_comparison_json_holds_the_summaries_recommendation_and_learning_curve(study):
    doc = json.loads((study.out / "comparison.json").read_text())
    summaries = {(s["configuration"], s["train_size"]): s for s in doc["summaries"]}
    assert set(summaries) == {(c, s) for c in ("feature-extraction", "partial-1") for s in ("3", "all")}
    for s in summaries.values():
        assert s["seeds"] == [0, 1] and set(s["val_accuracy"]) == {"mean", "std"}
        lo, hi = s["test_accuracy_interval"]
        assert lo <= s["test_accuracy"]["mean"] <= hi
    rec = doc["recommendation"]
    assert rec["configuration"] in ("feature-extraction", "partial-1") and rec["scored_on"] == "test"
    assert rec["images"] == 9 and rec["seeds"] == 2 and rec["train_size"] == "all"
    assert [s["train_size"] for s in doc["learning_curve"]["steps"]] == ["3", "all"]
    csv = (study.out / "comparison.csv").read_text().splitlines()
    assert len(csv) == 9 and "val_top2" in csv[0] and "test_top2" in csv[0]


def test_the_report_opens_with_the_recommendation_and_ends_with_the_set_up(study):
    md = (study.out / "report.md").read_text()
    titles = re.findall(r"^## (.+)$", md, re.M)
    assert titles[:3] == ["Recommendation", "Results", "Observations"] and titles[-1] == "Set-up"
    assert md.split("## Recommendation\n\n- ")[1].startswith("Recommended for this data with all 24 training images: ")
    page = (study.out / "report.html").read_text()
    assert "<details><summary><h2>Set-up</h2></summary>" in page and "<details><summary><h2>Every run (8)" in page
    setup = md.split("## Set-up")[1]
    assert "default" not in setup
    assert "| learning rates (AdamW) | head 0.001; trained blocks 3e-05 |" in setup
    assert "| input | 32 px (short side resized to" in setup
    assert "autocast off, channels_last off" in setup
    assert {"depth", "learning_curve"} <= {p.stem for p in (study.out / "plots").glob("*.png")}


def test_many_classes_get_per_class_numbers_and_top_k(study):
    md = (study.out / "report.md").read_text()
    assert "| class | images | precision | recall | F1 | most often taken for |" in md
    for name in CLASSES:
        assert re.search(rf"^\| {name} \| 4 \| \d\.\d{{3}} \|", md, re.M)
    assert "val top-2 %" in md
    if any(r.val.accuracy < 1 for r in study.rows):
        assert "**Most confused pairs**" in md or "most often taken for" in md


def test_nested_class_balanced_subsets():
    files = [Path(f"{i}.jpg") for i in range(30)]
    labels = [0] * 5 + [1] * 10 + [2] * 15
    train = ImageSet(Path("t"), ["x", "y", "z"], files, labels)
    subsets = nested_subsets(train, ["2", "6", "all"], seed=3)
    assert subsets["all"] is train
    assert subsets["2"].counts() == {"x": 2, "y": 2, "z": 2}
    assert subsets["6"].counts() == {"x": 5, "y": 6, "z": 6}  # a class with fewer gives all it has
    assert set(subsets["2"].files) < set(subsets["6"].files)
    whole, indices = subsets["6"].within
    assert whole is train and [files[i] for i in indices] == subsets["6"].files
    fractions = nested_subsets(train, ["0.2", "0.6"], seed=3)
    assert fractions["0.2"].counts() == {"x": 1, "y": 2, "z": 3} and set(fractions["0.2"].files) < set(fractions["0.6"].files)


def test_the_sweep_names_its_points_by_what_varies():
    config = tl.TrainConfig(data="d", backbone="tf_efficientnet_lite0")
    names = [p.name for p in plan(config, sweep(None, "0,1,3,all"))]
    assert names == ["feature-extraction", "partial-1", "partial-3", "full"]
    points = plan(config, sweep("two-stage,partial", [0, 2], ["50", "all"], [1, 2]))
    assert [p.name for p in points][:4] == ["feature-extraction_n50_seed1", "feature-extraction_n50_seed2",
                                            "feature-extraction_all_seed1", "feature-extraction_all_seed2"]
    assert {p.configuration for p in points} == {"feature-extraction", "two-stage-2", "partial-2"}
    assert {p.config.seed for p in points} == {1, 2} and all(p.config.unfreeze_blocks == 2 for p in points[4:])
    assert [p.name for p in plan(config, sweep("partial,full", 2))] == ["partial", "full"]


@pytest.mark.parametrize("arguments, message", [
    (("partial", "0,12"), "--unfreeze-blocks 12: tf_efficientnet_lite0 has 9 blocks; give 0 to 9 or all"),
    (("partial", "1,x"), "--unfreeze-blocks takes block counts"),
    (("full", "1,2"), "--unfreeze-blocks applies to partial and two-stage"),
    (("partial", None, "50,0.5"), "as images per class or as fractions, not both"),
    (("partial", None, "0"), "--train-sizes takes images per class"),
    (("partial", None, None, "0,0"), "--seeds takes distinct whole numbers"),
])
def test_wrong_sweeps_are_one_line_errors(arguments, message):
    with pytest.raises(TransferlabError, match=re.escape(message)):
        plan(tl.TrainConfig(data="d", backbone="tf_efficientnet_lite0"), sweep(*arguments))


def test_wilson_intervals_and_paired_tests_are_scipy_s():
    lo, hi = wilson(0.95, 100)
    assert (lo, hi) == pytest.approx((0.8883, 0.9785), abs=1e-4)
    assert wilson(1.0, 400)[1] == 1.0 and wilson(1.0, 400)[0] == pytest.approx(0.9905, abs=1e-4)
    # seed-averaged: an image right in 2 of 3 seeds against one right in 1 of 3 counts as a win
    assert Paired.test(np.array([2 / 3, 1, 1, 0]), np.array([1 / 3, 1, 0, 0])) == Paired(2, 0, 0.5)


def test_an_accuracy_axis_never_turns_one_image_into_a_cliff():
    ax = Figure().add_subplot()
    ax.plot([1, 2, 3], [0.9925, 0.995, 0.9925])
    plots.accuracy_axis(ax, 400, "validation accuracy")
    lo, hi = ax.get_ylim()
    assert hi - lo >= 20 / 400 and hi <= 1.01 and lo <= 0.9925
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert min(np.diff(ticks)) >= 1 / 400 - 1e-12
    assert ax.get_ylabel() == "validation accuracy\n(400 images; one image = 0.25 points)"


# ---------------------------------------------------------------- every observation, whatever the numbers


def _row(name: str, right: list[bool], loss: float = 0.3, seconds: float = 1.0, blocks: int = 0, size: str = "all",
         seed: int = 0, train_accuracy: float = 0.9, test: list[bool] | None = None) -> Row:
    labels = _labels(len(right))

    def probs(right: list[bool], labels: list[int]) -> np.ndarray:
        return np.array([[0.8, 0.2] if (y == 0) == ok else [0.2, 0.8] for y, ok in zip(labels, right)])

    val = probs(right, labels)
    test_probs = None if test is None else probs(test, _labels(len(test)))
    scores = Scores.of(val, labels, ["a", "b"])
    scores.loss = loss
    return Row(name, name, "feature-extraction" if blocks == 0 else "partial", size, 100 if size == "all" else 20,
               seed, blocks, 10 + 1000 * blocks, 10_000, 3, 3, train_accuracy, scores,
               None if test is None else Scores.of(test_probs, _labels(len(test)), ["a", "b"]),
               seconds + 0.5, seconds, 0, "imagenet", [Stage("head", 9 - blocks, 3, 1e-3, 3e-5)],
               [{"epoch": e, "stage": 1, "val_accuracy": 0.9, "val_loss": loss, "train_accuracy": 0.9,
                 "train_loss": loss} for e in (1, 2, 3)], val, test_probs)


def _labels(n: int) -> list[int]:
    return [i % 2 for i in range(n)]


def _view(rows: list[Row], test: int = 0) -> View:
    n = len(rows[0].val_probs)
    val = ImageSet(Path("val"), ["a", "b"], [Path(f"{i}.jpg") for i in range(n)], _labels(n))
    test_set = ImageSet(Path("test"), ["a", "b"], [Path(f"t{i}.jpg") for i in range(test)], _labels(test)) if test else None
    splits = Splits(ImageSet(Path("train"), ["a", "b"], [], []), val, test_set)
    sizes = tuple(dict.fromkeys(r.train_size for r in rows))
    c = Comparison(tl.TrainConfig(data="d"), Sweep(("partial",), ("0", "1"), sizes), splits, [f"b{i}" for i in range(9)],
                   {}, rows, [], Path("out"))
    return View.of(c)


def _sentences(notes: list[str], names: set[str]) -> None:
    for note in notes:
        assert note.endswith(".") and "  " not in note and " ." not in note and " ," not in note, note
        assert not re.search(r"\b(None|nan|inf)\b", note) and note.count("(") == note.count(")"), note
        assert "it was both" not in note and ": ;" not in note, note
        assert note[0].isupper() or note.split()[0] in names, note


RIGHT = [True] * 40
CASES = {
    "single": [_row("feature-extraction", RIGHT)],
    "win": [_row("feature-extraction", [i >= 12 for i in range(40)], seconds=1),
            _row("partial-1", RIGHT, seconds=9, blocks=1)],
    "narrow win": [_row("feature-extraction", [i != 0 for i in range(40)], seconds=1),
                   _row("partial-1", RIGHT, seconds=9, blocks=1)],
    "tie, same images": [_row("feature-extraction", RIGHT, loss=0.4, seconds=1),
                         _row("partial-1", RIGHT, loss=0.2, seconds=9, blocks=1)],
    "tie, other images": [_row("feature-extraction", [i != 0 for i in range(40)], loss=0.4, seconds=1),
                          _row("partial-1", [i != 1 for i in range(40)], loss=0.2, seconds=9, blocks=1)],
    "tie, same loss": [_row("feature-extraction", RIGHT), _row("partial-1", RIGHT, seconds=9, blocks=1)],
    "loss: costlier is worse": [_row("feature-extraction", RIGHT, seconds=1),
                                _row("partial-1", [i >= 3 for i in range(40)], seconds=9, blocks=1)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_observation_reads_as_a_sentence(case):
    rows = CASES[case]
    v = _view(rows)
    notes = report.recommendation_notes(v) + report.observations(v)
    _sentences(notes, {r.name for r in rows})
    joined = " ".join(notes)
    if case == "single":
        assert "It is the only configuration trained." in joined and "widest" not in joined
    if case == "win":
        assert ("partial-1 scored highest, +30.0 points ahead of feature-extraction: partial-1 was right on 12 "
                "validation images that feature-extraction got wrong and wrong on 0 that it got right (exact McNemar "
                "p = 0.00049), unlikely to be chance.") in joined
        assert notes[0].startswith("Recommended for this data: partial-1")
    if case == "narrow win":
        assert "within what chance gives, so the data cannot separate them" in joined
        assert notes[0].startswith("Recommended for this data: feature-extraction")
    if case == "tie, same images":
        assert ("partial-1 and feature-extraction tied on validation accuracy (100.0%): both got exactly the same "
                "validation images right; partial-1 ranks first on its lower validation loss (0.2000 vs 0.4000).") in joined
        assert "partial-1 gained no validation accuracy over feature-extraction for 9.0× its epochs' time." in joined
        assert "partial-1: no more accuracy for 9.0× the epochs' time (9 s)." in joined
    if case == "tie, other images":
        assert "partial-1 was right on 1 validation image that feature-extraction got wrong and wrong on 1" in joined
    if case == "tie, same loss":
        assert "their validation losses are equal too" in joined
    if case == "loss: costlier is worse":
        assert "partial-1: -7.5 points (worse) for 9.0× the epochs' time (9 s, p = 0.25)." in joined


def test_observations_with_seeds_sizes_and_a_test_set_read_as_sentences():
    rows = [_row(name, [i >= cut for i in range(40)], seconds=s, blocks=b, size=size, seed=seed,
                 test=[i >= cut // 2 for i in range(20)])
            for name, b, s, cuts in (("feature-extraction", 0, 1, (10, 2)), ("partial-1", 1, 9, (9, 0)))
            for size, cut in zip(("10", "all"), cuts) for seed in (0, 1)]
    v = _view(rows, test=20)
    notes = report.recommendation_notes(v) + report.observations(v)
    _sentences(notes, {"feature-extraction", "partial-1"})
    joined = " ".join(notes)
    assert "(mean ± standard deviation over 2 seeds)" in joined and "sign test over 2 seeds" in joined
    assert "Test accuracy (20 images, 95% Wilson intervals)" in joined
    assert notes[0].startswith("Recommended for this data with all 100 training images: ")
    assert "Its test accuracy is" in notes[0] and "(mean of 2 seeds)" in notes[0]
    assert re.search(r"Fine-tuning (did not beat|beat) feature extraction", joined)
    curve = v.analysis.curve
    assert [s.train_size for s in curve.steps] == ["10", "all"]
    assert curve.from_size is None if not curve.steps[-1].beat else curve.from_size in ("10", "all")


def test_a_compare_with_nothing_to_compare_says_which_flags_name_it():
    from transferlab.studies import sweep

    with pytest.raises(TransferlabError, match="say what to compare: --strategies .* or --unfreeze-blocks"):
        sweep()
    with pytest.raises(TransferlabError, match="name each strategy to compare once, got partial, partial"):
        sweep("partial,partial")
