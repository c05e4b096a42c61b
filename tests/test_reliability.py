"""Reliability: dirty data, decompression bombs, leakage, interrupted runs, unsafe files, wrong invocations."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import transferlab as tl
from transferlab import cli, data, training
from transferlab.errors import TransferlabError
from transferlab.runs import checkpoint_path

from .conftest import TINY, make_folder
from .dirty import checksum, make_dirty


def flags(options: dict) -> list[str]:
    """Keyword options as command-line flags (False booleans become --no-X)."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        out += ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return out


def error_line(capsys) -> str:
    """The one error line a failed command printed, last on stderr: no traceback, and nothing before it but
    the notes of the work done until the mistake showed (e.g. `scanning 6 files in DIR`)."""
    err = capsys.readouterr().err
    *notes, last = err.strip().splitlines()
    assert last.startswith("transferlab: error: ") and "Traceback" not in err, err
    assert not any(line.startswith("transferlab:") for line in notes), err
    return last


def relative(paths, root: Path) -> set[str]:
    return {str(Path(p).relative_to(root)) for p in paths}


def without_seconds(history: list[dict] | str) -> list[dict]:
    """Per-epoch rows (or history.csv) as text, without the one column that may differ between runs."""
    rows = csv.DictReader(io.StringIO(history)) if isinstance(history, str) else history
    return [{k: str(v) for k, v in row.items() if k != "seconds"} for row in rows]


# ---------------------------------------------------------------- dirty data


def test_dirty_folder_keeps_every_good_image_and_skips_every_bad_one_with_its_reason(folder):
    originals = relative(data.scan(folder).files, folder)
    dirty = make_dirty(folder)
    images = data.scan(folder)
    assert images.classes == ["cats", "dogs"]  # the hidden .thumbnails folder is no class
    assert relative(images.files, folder) == originals | set(dirty.good)
    reasons = {s.path: s.reason for s in images.skipped}
    assert set(reasons) == set(dirty.bad)
    for path, expected in dirty.bad.items():
        assert expected in reasons[path] and str(folder) not in reasons[path], (path, reasons[path])


def test_odd_images_decode_to_upright_rgb_with_their_true_colours(folder):
    dirty = make_dirty(folder)
    for path, colour in dirty.pixels.items():
        image = data.load_image(folder / path)
        assert image.mode == "RGB" and all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), colour)), path
    for path, size in dirty.sizes.items():
        assert data.load_image(folder / path).size == size, path


def test_data_check_train_and_predict_leave_the_folder_untouched(folder, tmp_path, capsys):
    dirty = make_dirty(folder)
    before = checksum(folder)
    assert cli.main(["data", "check", str(folder), "--json"]) == 0
    assert {s["path"] for s in json.loads(capsys.readouterr().out)["skipped"]} == set(dirty.bad)
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--out", str(run_dir), "--strategy", "feature-extraction",
                     *flags(TINY)]) == 0
    assert f"skipped {len(dirty.bad)} unusable file(s)" in capsys.readouterr().err
    assert cli.main(["predict", str(run_dir), str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert relative([r["path"] for r in rows if "error" in r], folder) == set(dirty.bad)
    assert relative([r["path"] for r in rows if "error" not in r], folder) == relative(data.scan(folder).files, folder)
    assert checksum(folder) == before


# ---------------------------------------------------------------- bombs and leakage


def test_the_decompression_bomb_limit_is_honoured_by_check_train_evaluate_and_predict(folder, tiny, capsys):
    big = folder / "cats" / "big.png"
    Image.new("RGB", (100, 100), "red").save(big)  # 10,000 pixels; the others have 1,600
    assert cli.main(["data", "check", str(folder), "--json", "--max-pixels", "5000"]) == 0
    skipped = json.loads(capsys.readouterr().out)["skipped"]
    assert [s["path"] for s in skipped] == ["cats/big.png"] and "--max-pixels" in skipped[0]["reason"]
    run = tl.train(folder, strategy="feature-extraction", max_pixels=5000, **tiny)
    assert [s["path"] for s in run.info["data"]["skipped"]] == ["cats/big.png"]
    assert [s["path"] for s in run.evaluate(folder)["skipped"]] == ["cats/big.png"]
    assert "decompression-bomb limit" in run.predict([big])[0]["error"]


def test_duplicates_across_splits_are_warned_about_and_recorded(folder, tmp_path, capsys):
    val = make_folder(tmp_path / "val", per_class=3, seed=1)
    shutil.copy(folder / "cats" / "cats_0.png", val / "cats" / "copy.png")
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--val", str(val), "--out", str(run_dir),
                     "--strategy", "feature-extraction", *flags(TINY)]) == 0
    assert "1 image(s) are byte-identical across splits" in capsys.readouterr().err
    duplicates = json.loads((run_dir / "config.json").read_text())["data"]["duplicates"]
    assert duplicates == [{"a": f"train:{folder / 'cats' / 'cats_0.png'}", "b": f"val:{val / 'cats' / 'copy.png'}"}]


# ---------------------------------------------------------------- interruption


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A folder, two-stage options and their uninterrupted run directory, shared by the interruption tests."""
    root = tmp_path_factory.mktemp("two-stage")
    folder = make_folder(root / "data")
    options = TINY | {"strategy": "two-stage", "epochs": 3, "patience": 2, "cache_dir": str(root / "cache")}
    assert len(tl.train(folder, out=root / "run", **options).history) == 6
    return folder, options, root / "run"


@pytest.mark.parametrize("stop_at", [3, 9, 13])  # run_epoch calls: stage 1 epoch 2, stage 2 epoch 2, final evaluation
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(stop_at, uninterrupted, tmp_path, monkeypatch):
    folder, options, reference = uninterrupted
    run_dir = tmp_path / "run"
    calls, run_epoch = [], training.run_epoch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", interrupted)
    with pytest.raises(training.Interrupted, match=f"--resume {run_dir}"):
        tl.train(folder, out=run_dir, **options)
    monkeypatch.undo()
    assert not run_dir.exists() and checkpoint_path(run_dir).is_file()
    with pytest.raises(TransferlabError, match="did not finish training"):
        tl.load(run_dir)

    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert not checkpoint_path(run_dir).exists()
    for name in ("metrics.json", "history.csv"):
        got, expected = ((d / name).read_text() for d in (run_dir, reference))
        assert got == expected if name == "metrics.json" else without_seconds(got) == without_seconds(expected)
    a, b = load_file(reference / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_exits_with_a_message(folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--out", str(run_dir), "--strategy", "full",  # uncached: slow epochs
            *flags(TINY | {"epochs": 15, "patience": 0})]
    process = subprocess.Popen([sys.executable, "-m", "transferlab.cli", *argv], text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint_path(run_dir).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"transferlab: interrupted; the finished epochs are saved: "
                                           f"continue with `transferlab train --resume {run_dir}`")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [checkpoint_path(run_dir).name]

    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert [int(row["epoch"]) for row in tl.load(run_dir).history] == list(range(1, 16))


def test_an_existing_run_dir_or_interrupted_run_is_only_replaced_with_overwrite(folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--out", str(run_dir), "--strategy", "feature-extraction", *flags(TINY)]
    assert cli.main(argv) == 0
    first = (run_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 2 and "pass --overwrite" in error_line(capsys)
    assert (run_dir / "model.safetensors").read_bytes() == first
    assert cli.main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert (run_dir / "model.safetensors").read_bytes() != first

    shutil.rmtree(run_dir)
    checkpoint_path(run_dir).write_bytes(b"an interrupted run")
    capsys.readouterr()
    assert cli.main(argv) == 2 and "--resume" in error_line(capsys)
    assert cli.main([*argv, "--overwrite"]) == 0 and not checkpoint_path(run_dir).exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    capsys.readouterr()
    argv[argv.index("--out") + 1] = str(tmp_path / "mine")
    assert cli.main([*argv, "--overwrite"]) == 2 and "not a transferlab run" in error_line(capsys)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


# ---------------------------------------------------------------- model files


class _RunsCode:
    """A pickle that would create `marker` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("damage", ["truncated weights", "pickle weights", "garbage config", "foreign config"])
def test_damaged_or_foreign_run_files_give_one_clear_error_and_run_no_code(damage, trained, folder, tmp_path, capsys):
    run_dir, marker = trained.path, tmp_path / "code-ran"
    weights, config = run_dir / "model.safetensors", run_dir / "config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "pickle weights":
        weights.write_bytes(pickle.dumps({"head.3.weight": _RunsCode(marker)}))
    elif damage == "garbage config":
        config.write_bytes(os.urandom(100))
    else:
        config.write_text(json.dumps({"_name_or_path": "bert-base", "architectures": ["BertModel"]}))
    assert cli.main(["predict", str(run_dir), str(folder / "cats" / "cats_1.jpg")]) == 2
    assert "is not a readable transferlab run" in error_line(capsys)
    assert not marker.exists()


# ---------------------------------------------------------------- wrong invocations


@pytest.mark.parametrize("argv,message", [
    (["--data", "{empty}"], "needs at least two class sub-folders"),
    (["--data", "{folder}/cats"], "needs at least two class sub-folders"),
    (["--data", "{broken}"], "no usable images for class(es): dogs"),
    (["--data", "{folder}", "--strategy", "partial", "--unfreeze-blocks", "10"], "between 1 and 9"),
    (["--data", "{folder}", "--epochs", "-1"], "--epochs must be a positive number"),
    (["--data", "{folder}", "--image-size", "8"], "--image-size must be at least 32"),
    (["--data", "{folder}", "--backbone", "inception_v3", "--image-size", "32"], "too small for backbone"),
    (["--data", "{folder}", "--val", "{three}"], "but the training data has"),
    (["--data", "{three}", "--val", "{folder}"], "no usable images for class(es): birds"),
    (["--data", "{folder}", "--workers", "-1"], "--workers must be"),
    (["--data", "{folder}", "--max-pixels", "0"], "--max-pixels must be"),
    (["--data", "{folder}", "--resume", "{tmp}/run"], "give it no others"),
])
def test_wrong_train_invocations_end_with_one_line_and_leave_no_run_dir(argv, message, folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = make_folder(tmp_path / "broken", per_class=3)
    for f in (broken / "dogs").iterdir():
        f.write_bytes(f.read_bytes()[:50])
    make_folder(tmp_path / "three", classes=("birds", "cats", "dogs"), per_class=3)
    paths = {"folder": folder, "empty": tmp_path / "empty", "broken": broken, "three": tmp_path / "three",
             "tmp": tmp_path}
    run_dir = tmp_path / "run"
    code = cli.main(["train", *flags(TINY), *(a.format(**paths) for a in argv), "--out", str(run_dir)])
    assert code == 2 and message in error_line(capsys)
    assert not run_dir.exists() and not checkpoint_path(run_dir).exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "{folder}"], "needs --data and --out"),
    (["train", "--data", "{folder}", "--out"], "expected one argument"),
    (["train", "--resume", "{tmp}/nothing-here"], "there is no interrupted run"),
    (["train", "--resume", "{tmp}/corrupt"], "cannot resume from"),
    (["evaluate", "{tmp}/missing", "--data", "{folder}"], "not a readable transferlab run"),
    (["predict", "{folder}", "{folder}/cats/cats_1.jpg"], "not a readable transferlab run"),
])
def test_wrong_invocations_end_with_one_line(argv, message, folder, tmp_path, capsys):
    checkpoint_path(tmp_path / "corrupt").write_bytes(b"not safetensors")
    assert cli.main([a.format(folder=folder, tmp=tmp_path) for a in argv]) == 2
    assert message in error_line(capsys)


def test_resume_of_a_finished_run_says_so(trained, capsys):
    assert cli.main(["train", "--resume", str(trained.path)]) == 2
    assert "finished training; there is nothing to resume" in error_line(capsys)


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("options", [
    {"strategy": "partial", "augment": "standard"},  # cached augmented views
    {"strategy": "full", "augment": "light"},  # images decoded and augmented every epoch
])
def test_same_seed_same_data_same_metrics(options, folder, tiny):
    first, second = (tl.train(folder, **(tiny | options)) for _ in range(2))
    assert first.metrics == second.metrics
    assert without_seconds(first.history) == without_seconds(second.history)
