"""compare: one run per strategy on shared data, comparison.json/csv, plots, Grad-CAM and the reports."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
import torch
from PIL import Image
from torch import nn

import transferlab as tl
from transferlab import cli
from transferlab.compare import COLUMNS, training_order
from transferlab.data import Preprocessing
from transferlab.model import Classifier, create_head
from transferlab.report import grad_cam, mcnemar

from .conftest import TINY, make_folder

STRATEGIES = ["feature-extraction", "partial", "full", "two-stage"]
FIELDS = {"strategy", "trainable_params", "total_params", "blocks_trained", "best_epoch", "epochs_run",
          "train_accuracy", "val_accuracy", "val_loss", "val_f1", "val_roc_auc", "test_accuracy", "test_f1",
          "test_roc_auc", "train_seconds", "history"}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    make_folder(root / "data")
    make_folder(root / "test", per_class=4, seed=1)
    return tl.compare(root / "data", STRATEGIES, root / "out", test=root / "test", cache_dir=str(root / "cache"),
                      **TINY)


def test_comparison_json_has_every_field_per_strategy(comparison):
    doc = json.loads((comparison.out / "comparison.json").read_text())
    entries = {e["strategy"]: e for e in doc["strategies"]}
    assert list(entries) == STRATEGIES
    assert doc["best"] == comparison.best["strategy"]
    assert doc["data"]["counts"]["test"] == {"cats": 4, "dogs": 4}
    for e in entries.values():
        assert FIELDS <= set(e), FIELDS - set(e)
        assert len(e["history"]) == e["epochs_run"] and 1 <= e["best_epoch"] <= e["epochs_run"]
        assert 0 <= e["val_accuracy"] <= 1 and 0 <= e["test_accuracy"] <= 1
        assert 0 < e["trainable_params"] <= e["total_params"]
    blocks = len(comparison.runs["full"].model.blocks)
    assert [entries[s]["blocks_trained"] for s in STRATEGIES] == [0, 1, blocks, 1]
    assert entries["feature-extraction"]["trainable_params"] < entries["partial"]["trainable_params"] \
        < entries["full"]["trainable_params"] == entries["full"]["total_params"]
    assert [s["trained_blocks"] for s in entries["two-stage"]["stages"]][0] == []


def test_every_strategy_is_a_normal_run_on_the_same_split(comparison):
    splits = set()
    for name in STRATEGIES:
        run = tl.load(comparison.out / name)
        assert run.config.strategy == name
        splits.add(tuple((r["split"], r["path"]) for r in run.split))
        assert run.evaluate(comparison.splits.val.root)["n_images"] > 0
    assert len(splits) == 1


def test_csv_has_the_flat_columns(comparison):
    rows = list(csv.DictReader(io.StringIO((comparison.out / "comparison.csv").read_text())))
    assert [r["strategy"] for r in rows] == STRATEGIES
    assert list(rows[0]) == [k for k, _, _ in COLUMNS]


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
            "gradcam"} <= {p.stem for p in (comparison.out / "plots").glob("*.png")}


def test_observations_come_from_the_numbers(comparison):
    md = (comparison.out / "report.md").read_text()
    best = comparison.best
    assert f"{best['strategy']} won" in md
    assert f"{best['val_accuracy']:.1%}" in md
    for r in comparison.rows:
        gap = 100 * (r["train_accuracy"] - r["val_accuracy"])
        assert f"{r['strategy']} {gap:+.1f} points" in md
        assert f"{r['strategy']} {r['trainable_params']:,} (" in md


def test_multiclass_comparison_reports_micro_averaged_roc(tmp_path, tiny):
    data = make_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=8)
    c = tl.compare(data, ["feature-extraction", "partial"], tmp_path / "out", **tiny | {"epochs": 1})
    assert [len(m) for m in (e["val_confusion_matrix"] for e in c.rows)] == [3, 3]
    assert "micro-averaged over the 3 classes" in (c.out / "report.md").read_text()


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


def test_mcnemar_exact_p_values():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(5, 5) == 1.0
    assert mcnemar(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar(3, 9) == mcnemar(9, 3) == pytest.approx(0.146, abs=1e-3)


def test_cli_compare_prints_the_table_and_refuses_to_clobber(folder, tmp_path, capsys):
    argv = ["compare", "--data", str(folder), "--strategies", "feature-extraction,partial", "--backbone",
            "mobilenetv2_100", "--weights", "none", "--image-size", "32", "--epochs", "1", "--workers", "0",
            "--amp", "off", "--out", str(tmp_path / "cmp")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^strategy\s+trainable", out, re.M) and "feature-extraction" in out and "report.html" in out
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("strategies, message", [("partial,bogus", "unknown strategies ['bogus']"),
                                                 ("full, full", "each strategy to compare once")])
def test_cli_compare_rejects_bad_strategy_lists(strategies, message, folder, tmp_path, capsys):
    assert cli.main(["compare", "--data", str(folder), "--strategies", strategies, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err


def test_shallower_frozen_prefixes_train_first_so_deeper_ones_start_from_their_features():
    configs = {s: tl.TrainConfig(data="d", strategy=s, backbone="tf_efficientnet_lite0", unfreeze_blocks=2)
               for s in ["full", "feature-extraction", "two-stage", "partial", "scratch"]}
    assert training_order(configs) == ["two-stage", "partial", "feature-extraction", "full", "scratch"]


def test_the_cost_plot_says_who_paid_for_the_shared_features(comparison):
    features = {r["strategy"]: r["features_computed"] for r in comparison.rows}
    assert features["feature-extraction"] == 0 and features["partial"] > 0  # partial trained first
    md = (comparison.out / "report.md").read_text()
    assert ("The time of partial, two-stage includes computing frozen-prefix features that feature-extraction "
            "then read from the cache.") in md
