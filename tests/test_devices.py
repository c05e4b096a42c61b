"""Devices and feeds: measured defaults per device, the switches recorded as they ran, the GPU decoding path's
pixels against the CPU path's, persistent workers, the scan record and the first-batch time.

Tests marked `gpu` run only where PyTorch sees a CUDA GPU; every other test pins the CPU (TINY), so that runs
compare exactly on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab as tl
from transferlab import cache, cli, data, devices, feeds
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.splits import Splits

from .conftest import SHARED, make_folder

CUDA = torch.cuda.is_available()


def _cpu(**options) -> devices.Device:
    return devices.resolve(TrainConfig(data=".", device="cpu", **options))


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_defaults_follow_what_was_measured_there(fast_bf16, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: fast_bf16)
    d = _cpu()
    assert d.type == "cpu" and d.channels_last and d.fold_bn and not d.gpu_decode
    assert (d.amp, d.fp32_depthwise_grads) == (("bf16", True) if fast_bf16 else ("off", False))
    assert d.workers == (0 if (os.cpu_count() or 1) <= 2 else min(os.cpu_count() - 1, 4))
    explicit = _cpu(amp="off", channels_last=False, fold_bn=False, workers=3)
    assert (explicit.amp, explicit.channels_last, explicit.fold_bn, explicit.fp32_depthwise_grads,
            explicit.workers) == ("off", False, False, False, 3)


@pytest.mark.parametrize("options,message", [
    ({"device": "cpu", "amp": "fp16"}, "--amp fp16 needs a GPU"),
    ({"device": "cpu", "gpu_decode": True}, "--gpu-decode needs a CUDA device"),
    *([] if CUDA else [({"device": "cuda"}, "PyTorch sees no CUDA GPU here")]),
])
def test_impossible_device_requests_are_one_clear_error(options, message):
    with pytest.raises(TransferlabError, match=message):
        devices.resolve(TrainConfig(data=".", **options))


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "--device must be auto, cpu, mps, cuda or cuda:N"),
    (["--amp", "fp8"], "--amp must be one of bf16, fp16, off"),
])
def test_bad_device_flags_are_one_line(argv, message, folder, tmp_path, capsys):
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_config_json_records_the_device_and_every_switch_as_it_ran(folder, tmp_path, tiny):
    run = tl.train(folder, out=tmp_path / "run", strategy="feature-extraction", **tiny)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["device"]
    assert recorded == run.info["device"]
    assert recorded["device"] == "cpu" and recorded["name"] and recorded["count"] >= 1 and recorded["memory_gb"] > 0
    assert (recorded["amp"], recorded["channels_last"], recorded["workers"]) == ("off", False, 0)
    assert {"fold_bn", "fp32_depthwise_grads", "gpu_decode", "inference_batch", "torch"} <= set(recorded)
    assert recorded["fold_bn"] is True  # left open in TINY: the CPU's default
    assert 0 < run.info["first_batch_seconds"] < run.info["train_seconds"] + 60


# ---------------------------------------------------------------- decoding on the device


def _jpeg(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, **save) -> Path:
    """A photo-like JPEG: smooth gradients plus noise, so that decoders and resizers have detail to differ on."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(1, 0.3, h)[:, None, None]
    a = (200 * ramp * rng.uniform(0.5, 1, (1, 1, 3)) + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(a)
    image = image.convert(mode) if mode != "RGB" else image
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def _decoded(files: list[Path], device: devices.Device, augment: str = "none") -> torch.Tensor:
    images = data.ImageSet(files[0].parent, ["a"], files, [0] * len(files))
    pre = data.Preprocessing(48, 55, "bicubic", (0.5,) * 3, (0.5,) * 3)
    config = TrainConfig(data=".", device=str(device.device), seed=3)
    keys = [(i, 2) for i in range(len(files))] if augment != "none" else None
    return torch.cat([x.cpu() for x, _ in feeds.Images(images, pre, config, device, augment, keys)])


def test_gpu_decoding_path_gives_the_cpu_paths_pixels(tmp_path):
    """The GPU path's code (bytes read in workers, one batched decode_jpeg call, resize/crop/augment on the
    decoded tensor), run here with the CPU's decoder: bit-identical to Pillow's path for photos below twice the
    resize size; above it, the CPU path decodes at a reduced DCT scale (Pillow's draft, much faster) and the
    two differ by about 2 grey levels on average. PNG, CMYK and files the decoder refuses go through Pillow."""
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees on display
    small = [_jpeg(tmp_path / f"{i}.jpg", (70 + 9 * i, 60), seed=i) for i in range(4)]
    grey = _jpeg(tmp_path / "grey.jpg", (64, 80), "L")
    turned = _jpeg(tmp_path / "turned.jpg", (90, 60), exif=exif.tobytes())
    png = tmp_path / "p.png"
    Image.open(small[0]).save(png)
    cmyk = _jpeg(tmp_path / "cmyk.jpg", (66, 66), "CMYK")
    files = [*small, grey, turned, png, cmyk]
    cpu = _cpu(amp="off", workers=0)
    on_device = dataclasses.replace(cpu, gpu_decode=True)
    assert feeds.is_plain_jpeg(grey) and not feeds.is_plain_jpeg(cmyk) and not feeds.is_plain_jpeg(png)
    assert torch.equal(_decoded(files, on_device), _decoded(files, cpu))
    assert torch.equal(_decoded(files, on_device, "standard"), _decoded(files, cpu, "standard"))

    large = [_jpeg(tmp_path / "large" / f"{i}.jpg", (400, 300), seed=i) for i in range(2)]
    difference = (_decoded(large, on_device).float() - _decoded(large, cpu).float()).abs()
    assert 0 < difference.mean() <= 3


def test_files_the_gpu_decoder_refuses_are_decoded_by_pillow(tmp_path, monkeypatch):
    files = [_jpeg(tmp_path / f"{i}.jpg", (60, 60), seed=i) for i in range(3)]
    refused = files[1].read_bytes()
    original = feeds.decode_jpeg

    def picky(encoded, **kwargs):
        batch = encoded if isinstance(encoded, list) else [encoded]
        if any(bytes(e.numpy()) == refused for e in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return original(encoded, **kwargs)

    monkeypatch.setattr(feeds, "decode_jpeg", picky)
    cpu = _cpu(amp="off", workers=0)
    assert torch.equal(_decoded(files, dataclasses.replace(cpu, gpu_decode=True)), _decoded(files, cpu))


def test_an_epochs_augmentation_is_the_same_with_worker_processes(folder, tiny):
    """Augmentation is seeded per (seed, epoch, image), so persistent workers change nothing but speed."""
    images = data.scan(folder)
    splits = Splits(images, images.subset(range(4)))
    pre = data.Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    config = TrainConfig(data=".", augment="standard", batch_size=8, device="cpu")

    def epochs(workers: int) -> list[torch.Tensor]:
        feed = feeds.ImageFeed(splits, pre, config, _cpu(amp="off", workers=workers))
        return [torch.cat([x for x, _ in feed.train(e)]) for e in (0, 1, 0)]

    inline, workers = epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))
    assert torch.equal(inline[0], inline[2]) and not torch.equal(inline[0], inline[1])


# ---------------------------------------------------------------- scanning once


def test_a_later_scan_decodes_only_new_or_changed_files(folder, tmp_path, monkeypatch):
    record = cache.scan_record(folder, tmp_path / "c")
    checked = []
    original = data._check
    monkeypatch.setattr(data, "_check", lambda args: checked.append(args[0]) or original(args))
    first = data.scan(folder, workers=1, record=record)
    assert len(checked) == 24 and record.is_file()
    checked.clear()
    again = data.scan(folder, workers=1, record=record)
    assert checked == [] and again.files == first.files and again.digests == first.digests
    broken = folder / "dogs" / "dogs_1.jpg"
    broken.write_bytes(broken.read_bytes()[:60])  # new size and mtime: checked again, now skipped
    third = data.scan(folder, workers=1, record=record)
    assert checked == [broken] and [s.path for s in third.skipped] == ["dogs/dogs_1.jpg"]
    assert data.scan(folder, workers=1, record=record, max_pixels=100).skipped  # another limit: all re-checked


def test_train_says_how_long_it_waited_for_the_first_batch(folder, tiny, capsys):
    tl.train(folder, strategy="full", **tiny | {"epochs": 1})
    err = capsys.readouterr().err
    assert "scanning 24 files" in err and "first training batch after" in err


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_a_run_on_cuda_matches_the_cpu_within_tolerance(tmp_path, tiny):
    folder = make_folder(tmp_path / "data", per_class=16)
    options = tiny | {"strategy": "full", "epochs": 2, "patience": 0}
    on_cpu = tl.train(folder, **options)
    on_gpu = tl.train(folder, **options | {"device": "cuda"})
    assert on_gpu.info["device"]["device"].startswith("cuda") and on_gpu.info["device"]["gpu_decode"]
    for a, b in zip(on_cpu.history, on_gpu.history):
        assert abs(a["val_loss"] - b["val_loss"]) < 0.05
    images = data.scan(folder)
    assert np.abs(on_cpu.probabilities(images) - on_gpu.probabilities(images)).max() < 0.05


@pytest.mark.gpu
def test_nvjpeg_pixels_are_close_to_pillows(tmp_path):
    files = [_jpeg(tmp_path / f"{i}.jpg", (70 + 9 * i, 60), seed=i) for i in range(4)]
    if SHARED.is_dir():
        files += sorted((SHARED / "validation" / "cats").glob("*.jpg"))[:32]
    cuda = devices.resolve(TrainConfig(data=".", device="cuda", workers=0))
    assert cuda.gpu_decode
    difference = (_decoded(files, cuda).float() - _decoded(files, _cpu(workers=0)).float()).abs()
    assert difference.mean() <= 3, difference.mean()
