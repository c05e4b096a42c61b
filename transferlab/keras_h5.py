"""Keras applications' .h5 weight files on timm backbones: VGG16 and VGG19 exactly, the others refused with why.

Keras keeps application weights in its HDF5 layout: the root attribute `layer_names` lists the layers in order,
and each layer's group has an attribute `weight_names` listing its arrays in order (a Conv2D: kernel
[height, width, in, out], then bias). Keras' VGG16 and VGG19 compute what timm's vgg16 and vgg19 compute once
each kernel is turned to [out, in, height, width]: both pad 3x3 convolutions by one pixel on every side
(`same`, stride 1) and max-pool 2x2. Their weights were trained on caffe-style input, which the run must feed.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .errors import TransferlabError

# Keras' preprocess_input(mode="caffe"), as a pretrained configuration: RGB to BGR, the ImageNet mean subtracted
# in pixels (BGR order), no scaling; mean and std in 0-1 units like timm's
CAFFE = {"mean": tuple(m / 255 for m in (103.939, 116.779, 123.68)), "std": (1 / 255,) * 3, "channels": "BGR"}

# the Keras application whose weights would fit each backbone
APPLICATIONS = {"vgg16": "VGG16", "vgg19": "VGG19", "resnet50": "ResNet50", "mobilenetv2_100": "MobileNetV2"}

# why timm's model of the same name would not compute what the Keras weights learnt
REFUSED = {
    "ResNet50": "Keras' ResNet50 strides in the first 1x1 convolution of each stage (ResNet v1) and gives its "
                "convolutions biases, while timm's resnet50 strides in the 3x3 one (v1.5), so the weights would "
                "not compute what they learnt",
    "MobileNetV2": "Keras' MobileNetV2 pads its stride-2 convolutions one pixel more at the bottom and right "
                   "(TensorFlow's 'same') and uses BatchNorm eps 1e-3, while timm's mobilenetv2_100 pads evenly "
                   "with eps 1e-5, so the weights would not compute what they learnt",
}


def refusal(backbone: str) -> str | None:
    """Why Keras' weights for `backbone` cannot be used, or None when they can."""
    return REFUSED.get(APPLICATIONS.get(backbone, ""))


def read(path: Path) -> dict[str, list[np.ndarray]]:
    """Every layer's arrays, in Keras' order (a whole saved model's weights too)."""
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            return {name: [np.asarray(root[name][w]) for w in _strings(root[name].attrs["weight_names"])]
                    for name in _strings(root.attrs["layer_names"])}
    except (OSError, KeyError) as e:
        raise TransferlabError(f"cannot read {path} as Keras weights ({str(e).splitlines()[0]})") from None


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def application(layers: dict[str, list[np.ndarray]]) -> str | None:
    """Which Keras application the layer names are from."""
    convs = sum(bool(re.fullmatch(r"block\d+_conv\d+", name)) for name in layers)
    if convs:
        return {13: "VGG16", 16: "VGG19"}.get(convs)
    if "conv1_conv" in layers or "res2a_branch2a" in layers:
        return "ResNet50"
    if "expanded_conv_depthwise" in layers:
        return "MobileNetV2"
    return None


def load(model: nn.Module, backbone: str, path: Path) -> tuple[str, dict]:
    """Put a Keras application's weights into timm `model`; returns the application and the pretrained
    configuration its weights were trained with (what differs from timm's)."""
    layers = read(path)
    found = application(layers)
    if found is None:
        raise TransferlabError(f"{path} holds no Keras VGG16, VGG19, ResNet50 or MobileNetV2 weights "
                               "(no layers named like block1_conv1, conv1_conv or expanded_conv_depthwise)")
    if found in REFUSED:
        raise TransferlabError(f"{path} holds Keras {found} weights, which transferlab does not load: {REFUSED[found]}")
    if APPLICATIONS.get(backbone) != found:
        raise TransferlabError(f"{path} holds Keras {found} weights, which fit backbone {found.lower()}, "
                               f"not {backbone}")
    model.load_state_dict(_vgg(model, layers, path, backbone), strict=False)
    return found, CAFFE


def _vgg(model: nn.Module, layers: dict[str, list[np.ndarray]], path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """timm's VGG `features` from Keras' layers block{b}_conv{i}, block b ending at the b-th max-pool; every
    convolution gets its kernel and bias (VGG's features have no other tensors)."""
    state, block, conv = {}, 1, 0
    for index, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            conv += 1
            name = f"block{block}_conv{conv}"
            arrays = layers.get(name, [])
            expected = list(module.weight.permute(2, 3, 1, 0).shape)  # Keras' [height, width, in, out]
            if len(arrays) != 2 or list(arrays[0].shape) != expected or arrays[1].shape != (expected[3],):
                raise TransferlabError(f"{path} has no {expected} kernel and bias in layer {name}, as {backbone} needs")
            kernel, bias = arrays
            state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            state[f"features.{index}.bias"] = torch.from_numpy(bias)
    return state
