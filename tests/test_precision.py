"""Mixed precision: depthwise convolutions take fp32 gradients where bf16 is slow, with the same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab import precision


class Depthwise(nn.Module):
    """The depthwise convolutions MobileNet/EfficientNet use: TF-'same' asymmetric padding with stride 2, 5x5,
    dilated, with and without bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False)
        self.wide = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)

    def forward(self, x):
        x = self.strided(F.pad(self.stem(x), (0, 1, 0, 1)))
        return self.dilated(self.wide(x)).square().mean()


def _gradients(model: nn.Module, x: torch.Tensor, context) -> dict[str, torch.Tensor]:
    model.zero_grad()
    x = x.clone().requires_grad_()
    with context:
        loss = model(x)
    loss.backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_gradients_match_plain_autocast_and_fp32(channels_last):
    torch.manual_seed(0)
    model, x = Depthwise(), torch.randn(2, 3, 17, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    reference = _gradients(model, x, torch.autocast("cpu", dtype=torch.bfloat16))
    fp32 = _gradients(model, x, torch.autocast("cpu", enabled=False))
    ours = _gradients(model, x, precision.autocast(True))
    for name in reference:
        scale = fp32[name].abs().max()
        assert (ours[name] - fp32[name]).abs().max() <= 0.03 * scale, name
        assert (ours[name] - reference[name]).abs().max() <= 0.03 * scale, name


def test_only_depthwise_convolutions_that_need_gradients_are_rerouted():
    model, x = Depthwise(), torch.randn(1, 3, 16, 16)
    with precision.autocast(True):
        assert type(model.strided(model.stem(x)).grad_fn).__name__ == "DepthwiseConvBackward"
        assert type(model.stem(x).grad_fn).__name__ != "DepthwiseConvBackward"  # dense: untouched
        with torch.no_grad():
            assert model.strided(model.stem(x)).dtype == torch.bfloat16
    assert model.strided(model.stem(x)).grad_fn.__class__.__name__ != "DepthwiseConvBackward"
