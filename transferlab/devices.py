"""Which device a run uses, and the speed switches that were measured fastest there.

Settled once at the entry point (`resolve`) and passed down as a frozen `Device`: nothing else in transferlab
asks what the device is. A switch changes how fast a run is, never what it computes beyond rounding; the user
can set any of them (TrainConfig fields), and the run's config.json records what each one was.

The defaults, and where they were measured (tf_efficientnet_lite0, batch 32):
- CPU with AVX-512 BF16 or AMX (the machines of earlier sessions): bf16 autocast made a forward pass 3.5x and a
  full fine-tuning step 1.7x faster than fp32; its depthwise-convolution gradients in fp32 (`precision`) 1.3-1.6x
  more; channels_last and folded BatchNorm faster in both (`benchmarks/speed.py`, README's figures).
- CPU without them (AVX2 only, this session's machines): bf16 is emulated and a forward pass ran 30x slower
  (2.5 vs 76 images/s), so autocast is off; channels_last still won in fp32 (76 vs 55 images/s).
- CUDA (one H200, PyTorch 2.11, issue #10): full fine-tuning on 600 photos took 0.8 s a later epoch and 1.6 s
  the first with autocast, channels_last and folding all off, against 1.0 s and 22.1 s with all three on, and
  1.3 s / 2.6 s with channels_last alone off: at this batch size the step is bound by kernel launches, which
  each switch adds to. JPEGs are decoded on the GPU (nvjpeg), since CPU decoding left it 98% idle.
- MPS: untested; the CUDA choices, with CPU decoding.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from . import precision
from .config import TrainConfig
from .errors import TransferlabError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Device:
    """A device and the switches a run uses on it."""

    device: torch.device
    name: str
    count: int  # GPUs of this type, or CPU cores
    memory_gb: float
    amp: str  # autocast dtype: bf16, fp16 or off
    channels_last: bool
    fold_bn: bool
    fp32_depthwise_grads: bool  # CPU bf16: compute the depthwise gradients oneDNN makes slow in fp32
    gpu_decode: bool
    workers: int  # image-decoding processes
    inference_batch: int  # images per no-gradient batch (feature caching, evaluation, prediction)

    @property
    def type(self) -> str:
        return self.device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision, as a context for the forward pass."""
        if self.amp == "off":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.type, dtype=AMP_DTYPES[self.amp]))
        if self.fp32_depthwise_grads:
            stack.enter_context(precision.DepthwiseGradients())
        return stack

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, which fp16 needs and everything else passes through."""
        return torch.amp.GradScaler(self.type, enabled=self.amp == "fp16")

    def place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, in the model's memory format; the copy overlaps compute from pinned memory."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that a timer reads what it took (a no-op on the CPU)."""
        if self.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self) -> str:
        """One line for the terminal: the device and the switches that change its speed."""
        switches = [self.amp if self.amp != "off" else "fp32"]
        switches += ["channels_last"] * self.channels_last + ["folded BatchNorm"] * self.fold_bn
        switches.append("JPEGs decoded on the GPU" if self.gpu_decode else
                        f"{self.workers} decoding workers" if self.workers else "decoding in this process")
        return f"{self.name}: {', '.join(switches)}"

    @property
    def pin_memory(self) -> bool:
        return self.type == "cuda"

    def describe(self) -> dict:
        """What config.json records: the device and every switch as the run used it."""
        return {"device": str(self.device), "name": self.name, "count": self.count,
                "memory_gb": round(self.memory_gb, 1), "amp": self.amp, "channels_last": self.channels_last,
                "fold_bn": self.fold_bn, "fp32_depthwise_grads": self.fp32_depthwise_grads,
                "gpu_decode": self.gpu_decode, "workers": self.workers, "inference_batch": self.inference_batch,
                "torch": torch.__version__}


def resolve(config: TrainConfig) -> Device:
    """The device `config` asks for, with every switch it leaves open set to the measured default there."""
    device = _pick(config.device)
    fast = _defaults(device, config.batch_size)
    amp = config.amp or fast["amp"]
    gpu_decode = fast["gpu_decode"] if config.gpu_decode is None else config.gpu_decode
    if amp == "fp16" and device.type == "cpu":
        raise TransferlabError("--amp fp16 needs a GPU; on the CPU use bf16 or off")
    if gpu_decode and device.type != "cuda":
        raise TransferlabError("--gpu-decode needs a CUDA device")
    return Device(
        device=device, **_hardware(device), amp=amp,
        channels_last=fast["channels_last"] if config.channels_last is None else config.channels_last,
        fold_bn=fast["fold_bn"] if config.fold_bn is None else config.fold_bn,
        fp32_depthwise_grads=device.type == "cpu" and amp == "bf16",
        gpu_decode=gpu_decode,
        workers=fast["workers"] if config.workers is None else config.workers,
        inference_batch=fast["inference_batch"],
    )


def _pick(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferlabError(f"--device {spec}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); "
                               "use --device cpu or install a CUDA build of PyTorch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TransferlabError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TransferlabError(f"--device {spec}: MPS is not available here; use --device cpu")
    return device if device.type != "cuda" or device.index is not None else torch.device("cuda", 0)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: where oneDNN runs bf16 natively instead of emulating it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _defaults(device: torch.device, batch_size: int) -> dict:
    """The switches measured fastest on this type of device (see the module docstring)."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return {"amp": "bf16" if cpu_has_fast_bf16() else "off", "channels_last": True, "fold_bn": True,
                "gpu_decode": False, "workers": 0 if cores <= 2 else min(cores - 1, 4),
                "inference_batch": batch_size}
    return {"amp": "off", "channels_last": False, "fold_bn": False, "gpu_decode": device.type == "cuda",
            "workers": min(max(cores - 1, 0), 8), "inference_batch": 4 * batch_size}


def _hardware(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "count": torch.cuda.device_count(), "memory_gb": props.total_memory / 2**30}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0.0
    if device.type == "mps":
        return {"name": "Apple GPU (MPS)", "count": 1, "memory_gb": memory}
    return {"name": f"{_cpu_model()} ({torch.backends.cpu.get_cpu_capability()})", "count": os.cpu_count() or 1,
            "memory_gb": memory}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()
