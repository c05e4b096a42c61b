"""compare: one run per strategy on shared data, comparison.json/csv, plots, Grad-CAM and the reports; the
comparison folder is replaced whole and only when it is one, and an interrupted comparison resumes."""

from __future__ import annotations

import base64
import importlib
import contextlib
import csv
import io
import json
import pkgutil
import re
import shutil

import pytest
import torch
from PIL import Image
from torch import nn

import transferlab as tl
from transferlab import cli, studies, training
from transferlab.comparison import Point, training_order
from transferlab.images import Preprocessing
from transferlab.errors import TransferlabError
from transferlab.model import Classifier, create_head
from transferlab.plots import grad_cam
from transferlab.studies import Paired

from .conftest import TINY, make_folder
from .test_reliability import error_line, flags

STRATEGIES = ["feature-extraction", "partial", "full", "two-stage"]
FIELDS = {"name", "configuration", "strategy", "train_size", "train_images", "seed", "trainable_params",
          "total_params", "blocks_trained", "best_epoch", "epochs_run", "train_accuracy", "val", "test",
          "train_seconds", "fit_seconds", "features_computed", "weights", "stages", "history"}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    make_folder(root / "data")
    make_folder(root / "test", per_class=4, seed=1)
    return tl.compare(root / "data", STRATEGIES, root / "out", test=root / "test", cache_dir=str(root / "cache"),
                      **TINY)


def test_comparison_json_has_every_field_per_strategy(comparison):
    doc = json.loads((comparison.out / "comparison.json").read_text())
    entries = {e["name"]: e for e in doc["points"]}
    assert list(entries) == STRATEGIES and doc["complete"] and doc["failures"] == []
    assert doc["best"] == comparison.best.name
    assert doc["data"]["counts"]["test"] == {"cats": 4, "dogs": 4}
    for e in entries.values():
        assert FIELDS <= set(e), FIELDS - set(e)
        assert len(e["history"]) == e["epochs_run"] and 1 <= e["best_epoch"] <= e["epochs_run"]
        assert 0 <= e["val"]["accuracy"] <= 1 and 0 <= e["test"]["accuracy"] <= 1
        assert 0 < e["trainable_params"] <= e["total_params"]
    blocks = len(comparison.blocks)
    assert [entries[s]["blocks_trained"] for s in STRATEGIES] == [0, 1, blocks, 1]
    assert entries["feature-extraction"]["trainable_params"] < entries["partial"]["trainable_params"] \
        < entries["full"]["trainable_params"] == entries["full"]["total_params"]
    assert [s["frozen"] for s in entries["two-stage"]["stages"]] == [blocks, blocks - 1]
    assert doc["recommendation"]["configuration"] in STRATEGIES and doc["recommendation"]["scored_on"] == "test"


def test_every_strategy_is_a_normal_run_on_the_same_split(comparison):
    splits = set()
    for name in STRATEGIES:
        run = tl.load(comparison.out / name)
        assert run.config.strategy == name
        splits.add(tuple((r["split"], r["path"]) for r in run.split))
    assert len(splits) == 1
    assert tl.load(comparison.out / "partial").evaluate(comparison.splits.val.root)["n_images"] > 0


def test_csv_has_the_flat_columns(comparison):
    rows = list(csv.DictReader(io.StringIO((comparison.out / "comparison.csv").read_text())))
    assert [r["name"] for r in rows] == STRATEGIES
    assert list(rows[0]) == list(comparison.rows[0].flat())
    assert {"val_accuracy", "val_loss", "test_accuracy", "fit_seconds", "train_images", "seed"} <= set(rows[0])


def test_html_is_self_contained_and_every_image_decodes(comparison):
    page = (comparison.out / "report.html").read_text()
    assert "<img" in page and not re.search(r"src=['\"](?!data:)", page)
    sources = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(sources) == page.count("<img") == len(list((comparison.out / "plots").glob("*.png")))
    for encoded in sources:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 100
    md = (comparison.out / "report.md").read_text()
    for path in re.findall(r"\]\((plots/[^)]+\.png)\)", md):
        Image.open(comparison.out / path).load()
    assert {"val_accuracy", "val_loss", "train_vs_val", "confusion", "roc", "accuracy_vs_time", "blocks",
            "gradcam", "depth"} <= {p.stem for p in (comparison.out / "plots").glob("*.png")}


def test_observations_come_from_the_numbers(comparison):
    md = (comparison.out / "report.md").read_text()
    best = comparison.best
    assert f"{best.name} scored highest" in md or f"{best.name} and " in md
    assert f"{best.val.accuracy:.1%}" in md
    for r in comparison.rows:
        assert f"{r.name} {100 * (r.train_accuracy - r.val.accuracy):+.1f} points" in md
        assert f"{r.name} {r.trainable_params:,} (" in md


@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_grad_cam_points_at_the_evidence_for_the_predicted_class(weight):
    """A dark image with a bright corner: the one-logit head calls it class 0 (weight 1) or class 1 (weight -1);
    either way its evidence is the darkness, so the map must be hot there and cold on the bright corner."""
    head = create_head("gap", [3, 8, 8], 1, 0.0)
    nn.init.constant_(head[-1].weight, weight)
    nn.init.zeros_(head[-1].bias)
    pre = Preprocessing(32, 32, "bilinear", (0.5,) * 3, (0.5,) * 3)
    model = Classifier(nn.ModuleList([nn.AvgPool2d(4)]), head, pre)
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[..., :8, :8] = 255
    cams, probs = grad_cam(model, images)
    assert cams.shape == (1, 32, 32) and cams.max() == pytest.approx(1)
    assert cams[0, :4, :4].max() < 0.05 and cams[0, 20:, 20:].min() > 0.95
    assert probs[0].argmax() == (weight < 0)
    with torch.no_grad():
        assert probs[0, 1] == pytest.approx(torch.sigmoid(model(images)[0, 0]).item())


def test_paired_test_is_the_exact_mcnemar_test_with_one_seed():
    def p(wins: int, losses: int) -> float:
        a = torch.tensor([1] * wins + [0] * losses + [1] * 7).numpy()
        b = torch.tensor([0] * wins + [1] * losses + [1] * 7).numpy()
        return Paired.test(a, b).p

    assert p(0, 0) == 1.0
    assert p(5, 5) == 1.0
    assert p(10, 0) == pytest.approx(2 / 1024)
    assert p(3, 9) == p(9, 3) == pytest.approx(0.146, abs=1e-3)


@pytest.mark.parametrize("strategies, message", [("partial,bogus", "unknown strategies ['bogus']"),
                                                 ("full, full", "each strategy to compare once")])
def test_cli_compare_rejects_bad_strategy_lists(strategies, message, folder, tmp_path, capsys):
    assert cli.main(["compare", "--data", str(folder), "--strategies", strategies, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err


def test_shallower_frozen_prefixes_train_first_so_deeper_ones_start_from_their_features():
    config = tl.TrainConfig(data="d", backbone="tf_efficientnet_lite0", unfreeze_blocks=2)
    points = [Point(s, s, tl.TrainConfig(**config.to_dict() | {"strategy": s}))
              for s in ["full", "feature-extraction", "two-stage", "partial", "scratch"]]
    assert [p.name for p in training_order(points)] == ["two-stage", "partial", "feature-extraction", "full",
                                                        "scratch"]


def test_the_report_says_who_computed_the_shared_features(comparison):
    """partial trains first and computes block n-1 for train, validation and test from the images; two-stage reads
    them and computes block n for train and validation from them; feature extraction reads those and computes
    block n for the test images alone."""
    features = {r.name: r.features_computed for r in comparison.rows}
    assert features == {"feature-extraction": 1, "partial": 3, "full": 0, "two-stage": 2}
    md = (comparison.out / "report.md").read_text()
    assert ("The frozen-prefix features were computed once for the whole comparison, 6 arrays in all (by "
            "feature-extraction 1, partial 3, two-stage 2); every other point read them from the shared cache.") in md


# ---------------------------------------------------------------- the comparison folder (issue 11, items 3 and 4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An uninterrupted two-point comparison from the command line, its arguments and what it printed."""
    root = tmp_path_factory.mktemp("pair")
    data = make_folder(root / "data")
    argv = ["compare", "--data", str(data), "--strategies", "feature-extraction,partial",
            *flags(TINY | {"cache_dir": str(root / "cache")}), "--out"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv + [str(root / "out")]) == 0
    return root, argv, printed.getvalue()


def test_cli_compare_prints_the_table_and_the_recommendation(pair):
    root, _, printed = pair
    assert re.search(r"^configuration\s+blocks\s+trainable", printed, re.M)
    assert re.search(r"^feature-extraction\s+0\s", printed, re.M) and re.search(r"^partial\s+1\s", printed, re.M)
    assert "Recommended for this data: " in printed and f"report: {root / 'out' / 'report.html'}" in printed


def test_compare_refuses_a_photo_folder_or_a_folder_with_other_files(pair, folder, tmp_path, capsys):
    root, argv, _ = pair
    before = sorted(p.name for p in folder.rglob("*"))
    assert cli.main(argv + [str(folder), "--overwrite"]) == 2
    assert error_line(capsys).endswith(f"{folder} is not a comparison written by transferlab compare (it holds "
                                       "cats, dogs); refusing to replace it: choose another --out")
    assert sorted(p.name for p in folder.rglob("*")) == before
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "out", mixed)
    (mixed / "notes.txt").write_text("mine")
    assert cli.main(argv + [str(mixed), "--overwrite"]) == 2
    assert "(it holds notes.txt)" in error_line(capsys) and (mixed / "notes.txt").read_text() == "mine"
    assert cli.main(argv + [str(root / "out")]) == 2
    assert error_line(capsys).endswith(f"{root / 'out'} already exists; pass --overwrite to replace it")


def test_overwrite_replaces_an_older_comparison_whole_and_only_at_the_end(pair, tmp_path, monkeypatch):
    """An older comparison with a point and a plot this one does not make: while the new one trains, the old one
    is still there; afterwards nothing of it is left."""
    root, argv, _ = pair
    old = tmp_path / "old"
    shutil.copytree(root / "out", old)
    doc = json.loads((old / "comparison.json").read_text())
    doc["points"].append(doc["points"][0] | {"name": "scratch"})
    (old / "comparison.json").write_text(json.dumps(doc))
    shutil.copytree(old / "partial", old / "scratch")
    (old / "plots" / "stale.png").write_bytes((old / "plots" / "blocks.png").read_bytes())
    train_point = studies.train_point

    def while_training(point, *args):
        assert (old / "scratch").is_dir() and (old / "plots" / "stale.png").is_file()
        return train_point(point, *args)

    monkeypatch.setattr(studies, "train_point", while_training)
    assert cli.main(argv + [str(old), "--overwrite", "--seed", "1"]) == 0
    assert not (old / "scratch").exists() and not (old / "plots" / "stale.png").exists()
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in (root / "out").iterdir())
    assert json.loads((old / "comparison.json").read_text())["config"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no staging or old copy left beside it


def test_an_interrupted_compare_resumes_to_the_uninterrupted_result(pair, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the first point's second epoch, then (resumed from the API) between the points; the command-line
    resume finishes it with the numbers the uninterrupted comparison got."""
    root, argv, _ = pair
    out = tmp_path / "out"
    calls, run_epoch = [], training.run_epoch

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # partial (trained first): epoch 1, its validation, epoch 2
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", stopped)
    assert cli.main(argv + [str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"transferlab: interrupted with 0 of 2 points done: continue with `transferlab compare --resume {out}`")
    assert not out.exists()
    monkeypatch.undo()

    train_point = studies.train_point

    def between_points(point, *args):
        if point.name == "feature-extraction":
            raise KeyboardInterrupt
        return train_point(point, *args)

    monkeypatch.setattr(studies, "train_point", between_points)
    with pytest.raises(training.Interrupted, match=re.escape(f"1 of 2 points done: continue with `transferlab "
                                                             f"compare --resume {out}`")):
        tl.compare(root / "data", "feature-extraction,partial", out, resume=True, **TINY | {"cache_dir": str(root / "cache")})
    monkeypatch.undo()
    assert not out.exists()

    assert cli.main(["compare", "--resume", str(out)]) == 0
    got, expected = (json.loads((d / "comparison.json").read_text()) for d in (out, root / "out"))
    assert [p["name"] for p in got["points"]] == [p["name"] for p in expected["points"]]
    for a, b in zip(got["points"], expected["points"]):
        assert a["val"]["accuracy"] == b["val"]["accuracy"] and a["val"]["confusion"] == b["val"]["confusion"]
        assert a["val"]["loss"] == pytest.approx(b["val"]["loss"]) and a["best_epoch"] == b["best_epoch"]
        assert [h["val_loss"] for h in a["history"]] == pytest.approx([h["val_loss"] for h in b["history"]])
    assert got["recommendation"]["configuration"] == expected["recommendation"]["configuration"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert cli.main(["compare", "--resume", str(out)]) == 2
    assert error_line(capsys).endswith(f"{out} finished comparing; there is nothing to resume")


def test_resume_needs_the_options_it_began_with(pair, tmp_path, capsys):
    root, argv, _ = pair
    assert cli.main(["compare", "--resume", str(tmp_path / "none")]) == 2
    assert error_line(capsys).endswith(f"there is no interrupted comparison at {tmp_path / 'none'} to resume")
    assert cli.main(["compare", "--resume", str(root / "out"), "--epochs", "3"]) == 2
    assert "give it no others" in error_line(capsys)


def test_tl_compare_stays_the_function_after_every_submodule_is_imported():
    for module in pkgutil.iter_modules(tl.__path__):
        if module.name != "__main__":  # the command line itself
            importlib.import_module(f"transferlab.{module.name}")
    assert tl.compare.__module__ == "transferlab" and callable(tl.compare)


def test_a_misspelled_compare_option_names_the_valid_one(folder, tmp_path):
    with pytest.raises(TransferlabError, match="unknown option 'unfreeze_block' for compare; did you mean "
                                               "'unfreeze_blocks'\\?"):
        tl.compare(folder, "partial", tmp_path / "c", unfreeze_block=2)
    with pytest.raises(TransferlabError, match="did you mean 'seeds'"):
        tl.compare(folder, "partial", tmp_path / "c", sedes=[0, 1])
    assert not (tmp_path / "c").exists()
