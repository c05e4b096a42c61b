"""Where ImageNet weights come from: the caches in order, Keras .h5 and torchvision files, the offline messages.

Every file here is synthetic, in the real layout (names and shapes) with random values; nothing touches the
network (`_online` fails the test if asked) and every cache directory is the test's own (conftest).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import transferlab as tl
from transferlab import backbones, cli, keras_h5, weights
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.export import TOLERANCE, export
from transferlab.exported import ExportedModel
from transferlab.model import create_classifier
from transferlab.splits import load_splits

from .conftest import TINY

VGG_CHANNELS = (64, 128, 256, 512, 512)
VGG16_BLOCKS, VGG19_BLOCKS = (2, 2, 3, 3, 3), (2, 2, 4, 4, 4)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def online():
        raise AssertionError("a test asked for the network")

    monkeypatch.setattr(weights, "_online", online)


def write_keras(path, layers: dict[str, list[np.ndarray]]):
    """A weights file as Keras' save_weights writes it: layer_names, and per layer weight_names, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name in layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for name, arrays in layers.items():
            group = f.create_group(name)
            names = [f"{name}/{w}:0" for w in ("kernel", "bias", "moving_mean", "moving_variance")[:len(arrays)]]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays):
                group.create_dataset(n, data=a)
    return path


def vgg_layers(blocks, seed: int = 0, tiny: bool = False) -> dict[str, list[np.ndarray]]:
    """Keras' VGG layers in order (input, convolutions, pools) with He-scaled random kernels; `tiny` shapes only
    for files that are refused before any shape is read."""
    rng, layers, cin = np.random.default_rng(seed), {"input_1": []}, 3
    for b, (convs, cout) in enumerate(zip(blocks, VGG_CHANNELS), 1):
        cout = 2 if tiny else cout
        for i in range(1, convs + 1):
            kernel = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * np.float32((2 / (9 * cin)) ** 0.5)
            layers[f"block{b}_conv{i}"] = [kernel, rng.standard_normal(cout, dtype=np.float32) * np.float32(0.1)]
            cin = cout
        layers[f"block{b}_pool"] = []
    return layers


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras' Conv2D(padding='same') on one HWC image, straight from its HWIO kernel."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((1, 1), (1, 1), (0, 0))), (3, 3), axis=(0, 1))
    return np.einsum("hwcij,ijco->hwo", windows, kernel.astype(np.float64)) + bias


def keras_block1(image: np.ndarray, layers) -> np.ndarray:
    """What Keras' VGG16 computes up to block1_pool for an RGB uint8 HWC image, caffe preprocessing included."""
    x = image[..., ::-1].astype(np.float64) - np.array([103.939, 116.779, 123.68])
    for name in ("block1_conv1", "block1_conv2"):
        x = np.maximum(conv_same(x, *layers[name]), 0)
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


# ---------------------------------------------------------------- Keras


def test_keras_vgg16_weights_in_the_keras_cache_compute_what_keras_computes(folder, tmp_path, tiny):
    layers = vgg_layers(VGG16_BLOCKS)
    path = write_keras(tmp_path / "keras_home" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       layers)
    assert [(f.where, f.path, f.unusable) for f in weights.found("vgg16")] == [("Keras cache", path, None)]
    options = tiny | {"backbone": "vgg16", "weights": "imagenet", "epochs": 1}
    run = tl.train(folder, out=tmp_path / "run", strategy="feature-extraction", **options)

    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(next(run.model.parameters()).device)
    with torch.no_grad():
        got = run.model.features(x, 0, 1)[0].permute(1, 2, 0).double().cpu().numpy()
    expected = keras_block1(image, layers)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preprocessing"]["channels"] == "BGR"
    assert np.allclose(np.array(saved["preprocessing"]["mean"]) * 255, [103.939, 116.779, 123.68])
    assert np.allclose(np.array(saved["preprocessing"]["std"]) * 255, 1)
    assert saved["backbone"]["weights_file"] == str(path)
    assert saved["backbone"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "Keras cache" in saved["backbone"]["weights"] and "Keras VGG16" in saved["backbone"]["weights"]
    reloaded = tl.load(tmp_path / "run")  # rebuilt from config.json: BGR again, or the probabilities would move
    val = load_splits(run.config).val
    assert reloaded.model.bgr and np.allclose(reloaded.probabilities(val), run.probabilities(val), atol=1e-6)


def test_keras_vgg19_file_loads_layer_by_layer_and_other_files_are_refused_in_one_line(tmp_path, folder, capsys):
    layers = vgg_layers(VGG19_BLOCKS)
    path = write_keras(tmp_path / "vgg19.h5", layers)
    _, model = backbones.create("vgg19", 32)
    loaded = weights.load(model, "vgg19", str(path))
    assert loaded.cfg == keras_h5.CAFFE and loaded.file == path
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    names = [n for n, arrays in layers.items() if arrays]
    assert len(convs) == len(names) == 16 and names[10] == "block4_conv3"
    for conv, name in zip(convs, names):
        kernel, bias = layers[name]
        assert torch.equal(conv.weight, torch.from_numpy(kernel).permute(3, 2, 0, 1))
        assert torch.equal(conv.bias, torch.from_numpy(bias))

    refused = {
        "vgg16.h5": (vgg_layers(VGG16_BLOCKS, tiny=True), "fit backbone vgg16, not vgg19"),
        "resnet50.h5": ({"input_1": [], "conv1_pad": [], "conv1_conv": [np.zeros((7, 7, 3, 64)), np.zeros(64)]},
                        "strides in the first 1x1 convolution"),
        "mobilenet_v2.h5": ({"input_1": [], "Conv1": [np.zeros((3, 3, 3, 32))], "expanded_conv_depthwise": []},
                            "pads its stride-2 convolutions"),
        "other.h5": ({"dense": [np.zeros((4, 2)), np.zeros(2)]}, "holds no Keras VGG16, VGG19"),
    }
    for name, (file_layers, reason) in refused.items():
        with pytest.raises(TransferlabError, match=reason):
            weights.load(model, "vgg19", str(write_keras(tmp_path / name, file_layers)))
    with h5py.File(tmp_path / "not_keras.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(TransferlabError, match="cannot read .* as Keras weights"):
        weights.load(model, "vgg19", str(tmp_path / "not_keras.h5"))

    code = cli.main(["train", "--data", str(folder), "--backbone", "resnet50", "--weights",
                     str(tmp_path / "resnet50.h5"), "--image-size", "32", "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress notes aside
    assert code == 2 and len(errors) == 1 and errors[0].startswith("transferlab: error: ")
    assert "Keras ResNet50 weights" in errors[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- torchvision


def randomised(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state with BatchNorm far from the identity and every bias non-zero, so a swap shows."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("running_var", "weight")) and value.dim() == 1:  # BatchNorm scale and variance
            value = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith(("bias", "running_mean")):
            value = torch.randn(value.shape, generator=g) * 0.1
        state[key] = value
    return state


TORCHVISION = [("vgg16", "vgg16", "vgg16-397923af.pth"), ("resnet50", "resnet50", "resnet50-0676ba61.pth"),
               ("mobilenetv2_100", "mobilenet_v2", "mobilenet_v2-b0353104.pth"),
               ("efficientnet_b0", "efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth")]


def torchvision_file(directory, arch: str, filename: str) -> tuple[nn.Module, os.PathLike]:
    reference = getattr(torchvision.models, arch)(weights=None)
    reference.load_state_dict(randomised(reference))
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), directory / filename)
    return reference.eval(), directory / filename


@pytest.mark.parametrize("name,arch,filename", TORCHVISION)
def test_torchvision_files_load_onto_timm_backbones_with_the_same_outputs(tmp_path, name, arch, filename):
    reference, path = torchvision_file(tmp_path, arch, filename)
    _, model = backbones.create(name, 64)
    loaded = weights.load(model, name, str(path))
    assert loaded.cfg["interpolation"] == ("bicubic" if name == "efficientnet_b0" else "bilinear")
    body = reference.features if hasattr(reference, "features") else nn.Sequential(*list(reference.children())[:-2])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = body(x), model.eval().forward_features(x)  # the backbone; the classifier is replaced
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ---------------------------------------------------------------- caches, order, network


def hub_file(name: str, state: dict[str, torch.Tensor]) -> os.PathLike:
    """timm's weights for `name` as the Hugging Face cache under $HF_HOME keeps them."""
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    root = weights.hub_dir() / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    (root / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    path = root / "snapshots" / ("0" * 40) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_imagenet_weights_come_from_the_caches_in_order(tmp_path, capsys):
    _, tv = torchvision_file(weights.torch_dir(), "mobilenet_v2", "mobilenet_v2-b0353104.pth")
    keras = write_keras(weights.keras_dir() / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                        {"Conv1": [np.zeros((3, 3, 3, 32))], "expanded_conv_depthwise": []})
    assert weights.torch_dir() == tmp_path / "torch_home" / "hub" / "checkpoints"
    assert [(f.where, f.path) for f in weights.found("mobilenetv2_100")] == [("torchvision cache", tv),
                                                                            ("Keras cache", keras)]
    assert weights.source("mobilenetv2_100").path == tv
    assert "pads its stride-2" in weights.found("mobilenetv2_100")[1].unusable
    config = TrainConfig(data=".", backbone="mobilenetv2_100", image_size=32)
    assert create_classifier(config, 2, fold_bn=True).pre.interpolation == "bilinear"  # torchvision's evaluation, not timm's bicubic

    _, theirs = backbones.create("mobilenetv2_100", 32)
    state = randomised(theirs, seed=3)
    hub = hub_file("mobilenetv2_100", state)
    assert weights.source("mobilenetv2_100").where == "Hugging Face cache"
    _, model = backbones.create("mobilenetv2_100", 32)
    loaded = weights.load(model, "mobilenetv2_100", "imagenet")
    assert loaded.file == hub and loaded.cfg == {} and torch.equal(model.bn1.running_var, state["bn1.running_var"])
    assert create_classifier(config, 2, fold_bn=True).pre.interpolation == "bicubic"

    assert cli.main(["weights"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mobilenetv2_100"))
    assert "Hugging Face cache" in row and str(hub) in row
    assert f"not used: {keras}: Keras' MobileNetV2 pads" in out
    assert next(line for line in out.splitlines() if line.startswith("vgg16")).endswith("needs the network")
    assert "installed package" in next(line for line in out.splitlines() if line.startswith("tf_efficientnet_lite0"))


def test_offline_says_what_to_do_and_download_prepares_the_machine(monkeypatch, capsys, tmp_path):
    write_keras(weights.keras_dir() / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                {"conv1_conv": [np.zeros((7, 7, 3, 64)), np.zeros(64)]})
    monkeypatch.setattr(weights, "_online", lambda: False)
    _, model = backbones.create("resnet50", 32)
    with pytest.raises(TransferlabError, match=r"transferlab weights download resnet50.*strides in the first 1x1"):
        weights.load(model, "resnet50", "imagenet")
    assert cli.main(["weights", "download", "mobilenetv2_100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network here" in err and "transferlab weights download" in err

    _, theirs = backbones.create("mobilenetv2_100", 32)
    state = randomised(theirs, seed=4)
    asked = []

    def hf_hub_download(repo_id, filename, cache_dir):
        asked.append((repo_id, filename, cache_dir))
        return str(hub_file("mobilenetv2_100", state))

    monkeypatch.setattr(weights, "_online", lambda: True)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    assert cli.main(["weights", "download", "mobilenetv2_100"]) == 0
    assert "mobilenetv2_100: Hugging Face cache: " in capsys.readouterr().out
    assert asked == [("timm/mobilenetv2_100.ra_in1k", "model.safetensors", tmp_path / "hf_home" / "hub")]
    monkeypatch.setattr(weights, "_online", lambda: False)  # from now on the machine is offline
    _, model = backbones.create("mobilenetv2_100", 32)
    assert "Hugging Face cache" in weights.load(model, "mobilenetv2_100", "imagenet").source
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_weights_from_a_cache_give_a_stable_feature_cache_identity(folder, tiny):
    _, path = torchvision_file(weights.torch_dir(), "mobilenet_v2", "mobilenet_v2-b0353104.pth")
    options = tiny | {"weights": "imagenet"}
    first = tl.train(folder, strategy="feature-extraction", **options)
    assert first.info["cache"]["misses"] == 2
    assert first.info["backbone"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tl.train(folder, strategy="feature-extraction", **options).info["cache"]["misses"] == 0
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # other weights, maybe
    assert tl.train(folder, strategy="feature-extraction", **options).info["cache"]["misses"] == 2


def test_a_model_on_caffe_weights_exports_with_its_channel_swap_inside(tmp_path):
    config = TrainConfig(data="unused", **TINY)
    caffe = replace(create_classifier(config, 2, fold_bn=True).pre, **keras_h5.CAFFE)
    built = create_classifier(config, 2, fold_bn=True, pre=caffe)
    info = {"classes": ["a", "b"], "preprocessing": asdict(caffe), "backbone": {"weights": "none"}}
    run = tl.Run(config, info, built.model.eval(), [], {}, [], tmp_path)
    assert export(run).max_difference <= TOLERANCE  # the ONNX file swaps the channels as PyTorch does
    exported = ExportedModel(tmp_path / "model.onnx")
    assert exported.preprocessing == caffe
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    assert not np.allclose(exported.probabilities(x), exported.probabilities(x[:, ::-1].copy()), atol=1e-3)
