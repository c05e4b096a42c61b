"""CPU bf16 autocast's one weak spot: the few depthwise-convolution gradients that oneDNN's bf16 kernels make slow.

On CPUs with AVX-512 BF16, oneDNN's bf16 kernels make a forward pass about 3x faster than fp32, but two of
its bf16 depthwise-convolution backward kernels are slower than fp32 by far. Measured on these machines
(EPYC, 2 cores, batch 32, channels_last, milliseconds bf16 vs fp32): the input gradient of a strided one,
96 channels at 112x112: 100 vs 39, 672 channels 5x5 at 14x14: 71 vs 0.7; the weight gradient of a 5x5 one,
1152 channels at 7x7: 24 vs 5. MobileNet and EfficientNet are made of such convolutions: a profile of a full
fine-tuning step of tf_efficientnet_lite0 put 63% of it in convolution backward passes, mostly these. Those
two gradients are computed in fp32, everything else stays bf16, and the step runs 1.3-1.6x faster
(`benchmarks/speed.py`, over its runs). `devices.Device.autocast` adds this where the CPU runs bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d's arguments by name, however they were passed."""
    return input, weight, bias, stride, padding, dilation, groups


class DepthwiseGradients(TorchFunctionMode):
    """Routes depthwise F.conv2d calls that need gradients through `DepthwiseConv`; the rest pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and torch.is_grad_enabled():
            x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
            needs_grad = x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
            if groups > 1 and w.shape[1] == 1 and needs_grad and not isinstance(padding, str):
                return DepthwiseConv.apply(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)
        return func(*args, **kwargs)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution whose forward runs in bf16 and whose backward computes the input gradient of a
    strided convolution and the weight gradient of a kernel larger than 3x3 in fp32 (see the module doc)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = stride, padding, dilation, groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv

        def gradients(mask: list[bool], fp32: bool) -> tuple[torch.Tensor | None, ...]:
            """(input, weight, bias) gradients where `mask` asks, in fp32 or in the forward's dtype."""
            dtype = torch.float32 if fp32 else x.dtype
            # the input gradient needs only x's shape and memory layout (channels_last stays channels_last)
            inp = x.to(dtype) if mask[1] else torch.empty_like(x, dtype=dtype)
            return torch.ops.aten.convolution_backward(
                grad.to(dtype), inp, weight.to(dtype), None, stride, padding, dilation, False, [0, 0], groups, mask)

        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = gradients([True, False, False], fp32=max(stride) > 1)[0].to(x.dtype)
        if needs_w or needs_b:
            _, grad_w, grad_b = gradients([False, needs_w, needs_b], fp32=max(weight.shape[-2:]) > 3)
        return grad_x, grad_w, grad_b, None, None, None, None
