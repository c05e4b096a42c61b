"""Tiny synthetic image folders: classes that a small random-init model can tell apart in a few steps."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab as tl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cats-vs-dogs"


def make_folder(root: Path, classes=("cats", "dogs"), per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """Class i is a bright blob on the left (i=0), right (i=1), top (i=2)... with noise, as JPEG/PNG files."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            half = size // 2
            region = [(slice(None), slice(0, half)), (slice(None), slice(half, None)),
                      (slice(0, half), slice(None)), (slice(half, None), slice(None))][i % 4]
            a[region] += np.uint8(150 + 20 * (i // 4))
            Image.fromarray(a).save(root / name / f"{name}_{j}.{'png' if j % 3 == 0 else 'jpg'}")
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where PyTorch sees no CUDA GPU (CI); `pytest -m gpu` runs just them."""
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own feature cache and empty weight caches; nothing in the user's home is touched or
    found."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    for variable in ("TORCH_HOME", "HF_HOME", "KERAS_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


TINY = dict(backbone="mobilenetv2_100", weights="none", image_size=32, batch_size=8, epochs=2, workers=0,
            amp="off", channels_last=False, device="cpu")


@pytest.fixture
def tiny() -> dict:
    """Options for a fast run: random-init MobileNetV2 at 32 px, in-process decoding, fp32, on the CPU whatever
    the machine has, so that runs compare exactly (tests marked `gpu` cover CUDA)."""
    return dict(TINY)


@pytest.fixture
def trained(folder, tmp_path, tiny) -> tl.Run:
    return tl.train(folder, out=tmp_path / "run", strategy="partial", **tiny)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[tl.Run, str]:
    """A tiny trained run that `transferlab export --quantize int8` wrote as fp32 (RUN_DIR/model.onnx) and int8
    (RUN_DIR/model.int8.onnx), and what the command printed; its training folder is `run.config.data`."""
    from transferlab import cli

    root = tmp_path_factory.mktemp("deployed")
    run = tl.train(make_folder(root / "data"), out=root / "run", strategy="partial", cache_dir=str(root / "cache"),
                   **TINY)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["export", str(run.path), "--quantize", "int8"]) == 0
    return run, printed.getvalue()


@pytest.fixture(scope="session")
def deployed(exported) -> tl.Run:
    """The exported run, shared by the deployment tests."""
    return exported[0]
