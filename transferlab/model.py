"""A classifier = input normalisation + backbone blocks + a new head; frozen blocks form a prefix."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from . import backbones, weights
from .config import TrainConfig
from .data import Preprocessing
from .precision import conv_args


def create_head(kind: str, feature_shape: torch.Size, outputs: int, dropout: float) -> nn.Sequential:
    """`gap`: pool, dropout, linear (timm's default). `flatten`: the VGG16 notebooks' dense-256 head."""
    channels, height, width = feature_shape
    if kind == "gap":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, outputs))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(channels * height * width, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, outputs)
    )


class Classifier(nn.Module):
    """Takes uint8 (or 0-255 float) images; `forward(x, start=k)` takes the output of block k-1 instead,
    which is what lets cached frozen-prefix features train the rest.

    `frozen` blocks from the start have no gradients and always run in inference mode, so their BatchNorm
    statistics never drift (the classic fine-tuning bug). `bn_frozen` extends inference-mode BatchNorm to
    the trained blocks too (Keras' fine-tuning recipe; their affine weights still learn). BatchNorm in
    inference mode is folded into the convolution before it (`FoldedBatchNorm`: only faster; `fold_bn=False`
    turns it off).
    """

    def __init__(self, blocks: nn.ModuleList, head: nn.Module, pre: Preprocessing, fold_bn: bool = True):
        super().__init__()
        self.blocks, self.head = blocks, head
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
        self.bgr = pre.channels == "BGR"  # not a buffer: rebuilt from the run's recorded preprocessing
        self.frozen = 0
        self.bn_frozen = False
        self.folding = contextlib.nullcontext()
        if fold_bn:
            example = torch.randn(1, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(0))
            self.folding = FoldedBatchNorm(blocks, example)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB images in, what the weights were trained on out (caffe-trained weights: BGR, mean subtracted)."""
        x = x.float()
        return ((x.flip(1) if self.bgr else x) - self.mean) / self.std

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks[start:stop]; start=0 takes images."""
        if start == 0:
            x = self.normalize(x)
        with self.folding:
            for block in self.blocks[start:stop]:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits; the head runs in its own dtype (fp32) even under autocast, so that they (and the
        probabilities printed from them) are what the model says rather than bf16 roundings of it. It costs
        nothing: the head is tiny."""
        features = self.features(x, start)
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.to(next(self.head.parameters()).dtype))

    def freeze(self, frozen: int, bn_frozen: bool = False) -> None:
        """Freeze blocks[:frozen]; everything after, and the head, trains."""
        if not 0 <= frozen <= self.num_blocks:
            raise ValueError(f"frozen must be in 0..{self.num_blocks}")
        self.frozen, self.bn_frozen = frozen, bn_frozen
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for block in self.blocks[: self.frozen]:
            block.eval()
        if self.bn_frozen:
            for m in self.blocks.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


@dataclass
class Built:
    model: Classifier
    pre: Preprocessing
    block_names: list[str]
    feature_shape: list[int]
    weights: dict  # where the weights came from, for config.json


def create_classifier(config: TrainConfig, num_classes: int, fold_bn: bool, pre: Preprocessing | None = None
                      ) -> Built:
    """Backbone blocks + a fresh head on the CPU, seeded (a random-init backbone too). The weights are loaded and
    their preprocessing used, unless a saved run rebuilds itself with its recorded `pre` (its tensors follow).
    The caller puts it on its device."""
    torch.manual_seed(config.seed)
    backbone, timm_model = backbones.create(config.backbone, config.image_size)
    loaded = weights.Loaded(config.weights) if pre else weights.load(timm_model, config.backbone, config.weights)
    pre = pre or backbones.preprocessing(backbone.pretrained_cfg | loaded.cfg, config.image_size)
    head = create_head(config.head, backbone.feature_shape, 1 if num_classes == 2 else num_classes, config.dropout)
    model = Classifier(backbone.blocks, head, pre, fold_bn)
    return Built(model, pre, backbone.block_names, backbone.feature_shape, loaded.record())


class FoldedBatchNorm(TorchFunctionMode):
    """BatchNorm in inference mode is a per-channel affine map, so folded into the convolution that feeds it,
    it costs no pass over the activations: the convolution takes weight * scale and a bias, and the BatchNorm
    passes its input on. Parameters and gradients stay those of the unfolded model (the fold is recomputed
    from them at every call), so checkpoints and optimiser state are untouched. Equal up to rounding, which
    differs, as with channels_last: a ReLU input within rounding of 0 may fall on either side, and its gradient
    with it (so tests compare in float64). Measured here on tf_efficientnet_lite0, bf16, batch 32: a full
    fine-tuning step went from 53 to 68 images/s, an inference pass from 290 to 335.

    Pairs are found by running `example` through `blocks` once, and kept only if folding gives the same
    output with BatchNorm statistics far from the identity; a BatchNorm that is training (scratch,
    --train-bn) is never folded.
    """

    def __init__(self, blocks: nn.Module, example: torch.Tensor):
        super().__init__()
        self.bn_of = WeakIdKeyDictionary()  # conv.weight -> the BatchNorm its convolution's output goes to
        convs = [m for m in blocks.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in blocks.modules() if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats]
        if not convs or not norms:
            return
        outputs = {}  # id(output) -> (conv, output); holding the output keeps its id unique
        hooks = [c.register_forward_hook(lambda c, _, out: outputs.__setitem__(id(out), (c, out))) for c in convs]
        hooks += [n.register_forward_pre_hook(lambda n, args: self._pair(outputs.get(id(args[0])), n)) for n in norms]
        training, state = blocks.training, {k: v.clone() for k, v in blocks.state_dict().items()}
        blocks.eval()
        try:
            with torch.no_grad():
                _far_from_identity(norms)  # so that folding a convolution that also feeds elsewhere shows
                plain = _run(blocks, example)
                with self:
                    folded = _run(blocks, example)
        finally:
            for h in hooks:
                h.remove()
            blocks.load_state_dict(state)
            blocks.train(training)
        if (plain - folded).abs().max() > 1e-3 * plain.abs().max():
            self.bn_of.clear()  # some convolution's output also goes elsewhere: leave this backbone unfolded

    def _pair(self, produced: tuple[nn.Conv2d, torch.Tensor] | None, norm: nn.BatchNorm2d) -> None:
        if produced is not None and produced[0].out_channels == norm.num_features:
            self.bn_of[produced[0].weight] = norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, bias, *rest = conv_args(*args, **kwargs)
            norm = self.bn_of.get(weight)
            if norm is not None and not norm.training:
                scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
                shift = norm.bias - norm.running_mean * scale + (0 if bias is None else bias * scale)
                out = F.conv2d(x, weight * scale.view(-1, 1, 1, 1), shift, *rest)
                out.folded_into = norm.weight
                return out
        elif func is F.batch_norm:
            x, weight = _batch_norm_args(*args, **kwargs)
            folded_into = getattr(x, "folded_into", None)
            if folded_into is not None and folded_into is weight:
                return x
        return func(*args, **kwargs)


def _far_from_identity(norms: list[nn.BatchNorm2d]) -> None:
    """Statistics and affine weights that make each BatchNorm clearly not the identity (seeded)."""
    generator = torch.Generator().manual_seed(0)
    for m in norms:
        for tensor, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2), (m.weight, 0.5, 2),
                                  (m.bias, -1, 1)):
            tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))


def _batch_norm_args(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    """F.batch_norm's input and weight, however they were passed."""
    return input, weight


def _run(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x
