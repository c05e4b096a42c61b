"""Backbones as ordered lists of blocks, cut from timm models.

VGG: its five conv blocks (split at each max-pool). ResNet: stem + four stages. EfficientNet / MobileNet:
stem, each stage, head conv. Any other timm model works when its top-level children, in order, compose to
its `forward_features`; that is checked on every build, so a wrong cut can never train silently.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import timm
import torch
from torch import nn

from .data import Preprocessing
from .errors import TransferlabError

LISTED = (
    "vgg16", "vgg19", "resnet50", "mobilenetv2_100", "efficientnet_b0",
    "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
)
_HEAD_CHILDREN = {"global_pool", "pre_logits", "head", "fc", "classifier", "head_drop", "fc_norm"}
_STAGE_LISTS = {"blocks", "stages", "layers"}
_STAGE = re.compile(r"^(layer|stage|s)\d+$")


@dataclass
class Backbone:
    name: str
    blocks: nn.ModuleList
    block_names: list[str]
    pretrained_cfg: dict
    feature_shape: list[int]  # [channels, height, width] out of the last block at the built image size


def _cut(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children of a timm model, before its pooling/classifier, regrouped into blocks."""
    blocks: list[tuple[str, nn.Module]] = []
    loose: list[tuple[str, nn.Module]] = []  # stem or head-conv layers waiting to be grouped

    def flush():
        if loose:
            name = "stem" if not blocks else "head_conv"
            blocks.append((name, loose[0][1] if len(loose) == 1 else nn.Sequential(*(m for _, m in loose))))
            loose.clear()

    for name, child in model.named_children():
        if name in _HEAD_CHILDREN:
            break
        pools = [i for i, m in enumerate(child.children()) if isinstance(m, nn.MaxPool2d)] \
            if isinstance(child, nn.Sequential) else []
        if len(pools) > 1:  # VGG-style features: one block per max-pool
            flush()
            layers, start = list(child), 0
            for i in pools:
                blocks.append((f"block{len(blocks) + 1}", nn.Sequential(*layers[start:i + 1])))
                start = i + 1
        elif name in _STAGE_LISTS and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            flush()
            blocks += [(f"{name}.{i}", stage) for i, stage in enumerate(child)]
        elif _STAGE.match(name):
            flush()
            blocks.append((name, child))
        else:
            loose.append((name, child))
    flush()
    return blocks


def create(name: str, image_size: int | None = None) -> tuple[Backbone, nn.Module]:
    """(Backbone, the full timm model it was cut from, for loading weights); randomly initialised.

    Image size None means the backbone's pretrained size.
    """
    model = _timm_model(name)
    image_size = image_size or model.pretrained_cfg["input_size"][-1]
    cut = _cut(model)
    blocks = nn.ModuleList(m for _, m in cut)
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        try:
            expected = model.forward_features(x)
        except (RuntimeError, AssertionError, ValueError):
            raise TransferlabError(f"image size {image_size} is too small for backbone {name}") from None
        got = x
        for block in blocks:
            got = block(got)
    if len(blocks) < 2 or got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4):
        raise TransferlabError(f"cannot find the blocks of backbone {name!r}; pick one of {', '.join(LISTED)}")
    return Backbone(name, blocks, [n for n, _ in cut], dict(model.pretrained_cfg), list(expected.shape[1:])), model


def _timm_model(name: str) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError:
        guess = difflib.get_close_matches(name, [*LISTED, *timm.list_models()], 1, cutoff=0.7)
        raise TransferlabError(
            f"unknown backbone {name!r}" + (f"; did you mean {guess[0]!r}?" if guess else "")
            + f" (listed: {', '.join(LISTED)}; any timm model name works)"
        ) from None


def preprocessing(cfg: dict, image_size: int | None = None) -> Preprocessing:
    """Size, resize, interpolation, mean/std and channel order from a pretrained configuration: the backbone's
    own, with what its weights change (`channels` is transferlab's key, for caffe-trained weights)."""
    size = image_size or cfg["input_size"][-1]
    crop_pct = cfg.get("crop_pct", 0.875)
    return Preprocessing(
        size=size,
        resize=int(round(size / crop_pct)),
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        channels=cfg.get("channels", "RGB"),
    )


def _cut_on_meta(name: str) -> list[tuple[str, nn.Module]]:
    """The blocks of a model built on the meta device: no memory, no time, no weights."""
    with torch.device("meta"):
        return _cut(_timm_model(name))


def block_names(name: str) -> list[str]:
    """The backbone's block names, cheaply: what a run checks before it scans any image."""
    return [n for n, _ in _cut_on_meta(name)]


def describe(name: str) -> dict:
    """A row of `transferlab backbones`."""
    from . import weights

    cut = _cut_on_meta(name)
    return {
        "name": name,
        "blocks": [n for n, _ in cut],
        "params": sum(p.numel() for _, m in cut for p in m.parameters()),
        "imagenet_offline": weights.available_offline(name),
    }
