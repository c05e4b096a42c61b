"""A classifier = input normalisation + backbone blocks + a new head; frozen blocks form a prefix."""

from __future__ import annotations

import torch
from torch import nn

from .data import Preprocessing

HEADS = ("gap", "flatten")


def make_head(kind: str, feature_shape: torch.Size, outputs: int, dropout: float) -> nn.Sequential:
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
    the trained blocks too (Keras' fine-tuning recipe; their affine weights still learn).
    """

    def __init__(self, blocks: nn.ModuleList, head: nn.Module, pre: Preprocessing):
        super().__init__()
        self.blocks, self.head = blocks, head
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
        self.frozen = 0
        self.bn_frozen = False

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks[start:stop]; start=0 takes images."""
        if start == 0:
            x = self.normalize(x)
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.head(self.features(x, start))

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
