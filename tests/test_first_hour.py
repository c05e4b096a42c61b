"""What a new user meets in the first hour: the API's traps, dataset roots, Ctrl-C, unwritable outputs, messages,
start-up cost, and a run in a notebook (issue #11)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import transferlab as tl
from transferlab import backbones, cli, data, weights
from transferlab.errors import TransferlabError
from transferlab.model import Classifier, create_head

from .conftest import TINY, make_folder
from .test_reliability import _RunsCode, error_line, flags


# ---------------------------------------------------------------- one path means one path


def test_a_single_path_is_one_image_or_one_folder(trained, folder, tmp_path, monkeypatch):
    image = folder / "dogs" / "dogs_1.jpg"
    for one in (str(image), image):
        rows = trained.predict(one)
        assert [r["path"] for r in rows] == [str(image)] and "error" not in rows[0]
    monkeypatch.chdir(folder / "cats")  # a relative name: that file, not its characters
    assert [r["path"] for r in trained.predict("cats_1.jpg")] == ["cats_1.jpg"]
    assert len(trained.predict(str(folder / "cats"))) == 12


def test_predict_can_raise_instead_of_returning_error_rows(trained, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert "cannot decode" in trained.predict(bad)[0]["error"]
    with pytest.raises(TransferlabError, match="bad.jpg: cannot decode"):
        trained.predict(bad, errors="raise")


def test_predicting_on_a_folder_without_images_says_so(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(trained.path), str(tmp_path / "empty")]) == 2
    assert "no images found in" in error_line(capsys)


def test_top_k_on_a_two_class_model_shows_both_classes(trained, folder, capsys):
    assert cli.main(["predict", str(trained.path), str(folder / "cats" / "cats_1.jpg"), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("cats") >= 2 and "dogs" in line  # path, label, and the other class with its probability
    assert [t["label"] for t in trained.predict(folder / "cats" / "cats_1.jpg", top_k=5)[0]["top"]] in (
        ["cats", "dogs"], ["dogs", "cats"])


def test_compare_takes_strategies_as_one_comma_separated_string():
    from transferlab.studies import sweep

    assert sweep("partial, full").strategies == ("partial", "full")
    assert sweep("full").strategies == ("full",)


# ---------------------------------------------------------------- dataset roots


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    root = tmp_path / "photos"
    make_folder(root / "train", per_class=8)
    make_folder(root / "val", per_class=3, seed=1)
    return root


def test_a_dataset_root_is_its_train_and_validation_folders(dataset_root, tmp_path, capsys):
    assert cli.main(["train", "--data", str(dataset_root), "--out", str(tmp_path / "run"),
                     "--strategy", "feature-extraction", *flags(TINY)]) == 0
    assert "holds split folders: train/ for training, val/ for validation" in capsys.readouterr().err
    run = tl.load(tmp_path / "run")
    assert run.classes == ["cats", "dogs"]  # not "train" and "val"
    assert {r["split"] for r in run.split} == {"train", "val"}
    assert sum(r["split"] == "val" for r in run.split) == 6


def test_a_comparison_on_a_dataset_root_is_titled_by_the_root(dataset_root, tmp_path):
    comparison = tl.compare(dataset_root, "feature-extraction", tmp_path / "cmp", cache_dir=str(tmp_path / "cache"),
                            **TINY)
    title = (comparison.out / "report.md").read_text().splitlines()[0]
    assert title == f"# Fine-tuning compared: {TINY['backbone']} on {dataset_root}"  # not .../photos/train


def test_data_check_describes_a_dataset_root_split_by_split(dataset_root, capsys):
    assert cli.main(["data", "check", str(dataset_root)]) == 0
    out = capsys.readouterr().out
    assert "train (" in out and "16 usable images in 2 classes: cats 8, dogs 8" in out
    assert "validation (" in out and "6 usable images in 2 classes: cats 3, dogs 3" in out
    assert cli.main(["data", "check", str(dataset_root), "--json"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert splits["validation"]["counts"] == {"cats": 3, "dogs": 3}


def test_data_check_accepts_a_dataset_name(dataset_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "named").mkdir()
    dataset_root.rename(tmp_path / "named" / "cats-vs-dogs")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "named"))
    assert cli.main(["data", "check", "cats-vs-dogs", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["splits"]) == {"train", "validation"}


def test_data_check_warns_and_fails_when_a_class_has_no_usable_image(folder, capsys):
    for f in (folder / "dogs").iterdir():
        f.write_bytes(b"broken")
    assert cli.main(["data", "check", str(folder)]) == 1
    assert "no usable images for class(es) dogs" in capsys.readouterr().err


# ---------------------------------------------------------------- Ctrl-C and unwritable outputs


def _interrupted(argv: list[str], after: float | str, cwd: Path) -> tuple[int, str]:
    """Exit code and stderr of `transferlab ARGV` sent SIGINT after `after` seconds, or once stderr shows `after`."""
    process = subprocess.Popen([sys.executable, "-m", "transferlab.cli", *argv], cwd=cwd, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = ""
    if isinstance(after, str):
        while after not in seen and process.poll() is None:
            seen += process.stderr.readline()
    else:
        time.sleep(after)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    return process.returncode, seen + rest


@pytest.mark.parametrize("after", [0.3, "scanning", "stage 1"])
def test_ctrl_c_at_any_moment_is_one_clear_line(after, folder, tmp_path):
    argv = ["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--strategy", "full",
            *flags(TINY | {"epochs": 20, "patience": 0})]
    code, err = _interrupted(argv, after, tmp_path)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err, err
    assert code in (130, -signal.SIGINT), err  # -SIGINT: stopped before Python could handle the signal
    assert code != 130 or (last.startswith("transferlab: interrupted") and sum(
        line.startswith("transferlab:") for line in err.splitlines()) == 1), err


@pytest.mark.parametrize("out", ["{file}/run", "/proc/transferlab-run"])
def test_an_unwritable_out_fails_before_any_work(out, folder, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    out = out.format(file=tmp_path / "file")
    for argv in (["train", "--strategy", "feature-extraction"], ["compare", "--strategies", "partial,full"]):
        assert cli.main([*argv, "--data", str(folder), "--out", out, *flags(TINY)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {out}" in err and "scanning" not in err, err


def test_a_folder_that_is_no_run_is_refused_without_suggesting_overwrite(folder, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "mine"), *flags(TINY)]) == 2
    line = error_line(capsys)
    assert "is not a transferlab run directory" in line and "--overwrite" not in line


# ---------------------------------------------------------------- messages


def test_weights_that_are_not_tensors_never_suggest_running_their_code(tmp_path, capsys, folder):
    marker = tmp_path / "code-ran"
    (tmp_path / "w.pth").write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "r"), "--weights",
                     str(tmp_path / "w.pth"), *flags({k: v for k, v in TINY.items() if k != "weights"})]) == 2
    line = error_line(capsys)
    assert "is not a state dict of tensors" in line and "weights_only" not in line and not marker.exists()


def test_near_misses_are_named(monkeypatch):
    with pytest.raises(TransferlabError, match="did you mean 'resnet50'"):
        backbones.block_names("resnet_50")
    monkeypatch.setattr(weights, "_hub_cached", lambda name: False)
    monkeypatch.setattr(weights, "_online", lambda: False)
    _, model = backbones.create("efficientnet_lite0", 32)
    with pytest.raises(TransferlabError, match="did you mean tf_efficientnet_lite0"):
        weights.load(model, "efficientnet_lite0", "imagenet")
    with pytest.raises(TransferlabError, match="did you mean 'strategy'"):
        tl.train("photos", strateg="full")


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def offline(url, to):
        Path(to).write_bytes(b"half an archive")
        raise OSError("no network")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", offline)
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "datasets"))
    with pytest.raises(TransferlabError, match="connect to the internet"):
        data.download("cats-vs-dogs")
    assert not (tmp_path / "datasets").exists()


def test_version_and_every_argument_is_described_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"transferlab {tl.__version__}"
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("evaluate", "predict", "train", "compare", "backbones"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.dest} has no help"


def test_backbones_names_its_columns_once(capsys):
    assert cli.main(["backbones"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split().count("blocks") == 1


# ---------------------------------------------------------------- start-up cost


@pytest.mark.parametrize("argv,allowed", [
    (["--help"], set()),
    (["train", "--epochs", "ten"], set()),
    (["data", "check", "{folder}"], set()),
])
def test_commands_do_not_import_what_they_do_not_use(argv, allowed, folder):
    script = f"""
        import sys
        from transferlab import cli
        try:
            cli.main({[a.format(folder=folder) for a in argv]!r})
        except SystemExit:
            pass
        heavy = {{"torch", "timm", "torchvision", "sklearn", "matplotlib"}}
        print(sorted(m for m in heavy if m in sys.modules))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    assert set(json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))) <= allowed


# ---------------------------------------------------------------- in a notebook


def test_a_run_reads_well_in_a_notebook(trained):
    loaded = tl.load(trained.path)
    text = repr(loaded)
    assert len(text) < 300 and "mobilenetv2_100" in text and "partial" in text and "cats" in text
    assert "<table>" in loaded._repr_html_() and "accuracy" in loaded._repr_html_()
    row = loaded.history[0]
    assert isinstance(row["epoch"], int) and isinstance(row["val_loss"], float) and row["trained"] == "last 1"
    assert loaded.history == trained.history or all(
        abs(a["val_loss"] - b["val_loss"]) < 1e-9 for a, b in zip(loaded.history, trained.history))


def test_the_head_and_probabilities_are_computed_in_fp32_under_autocast():
    head = create_head("gap", [4, 2, 2], 3, 0.0)
    model = Classifier(torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, stride=16)]), head,
                       data.Preprocessing(32, 32, "bilinear", (0.5,) * 3, (0.5,) * 3), fold_bn=False).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.features(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, head(features.float()))
