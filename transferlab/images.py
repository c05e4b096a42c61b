"""Image files: find them, decode them safely, and prepare them as a model's input, with NumPy and Pillow only.

No torch here, so that an exported model (`transferlab.exported`) predicts with nothing but ONNX Runtime,
NumPy and Pillow installed. Nothing here writes to the user's folders: files are only ever opened for reading.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class UploadLimits:
    """What one request to `transferlab serve` may upload (--max-file-mb, --max-request-mb, --max-files)."""

    file_mb: float = 20
    request_mb: float = 50
    files: int = 16


class BadImage(Exception):
    """A file that looks like an image but cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's weights want their input: resize the short side to `resize`, centre-crop `size`,
    reorder the channels (RGB, or BGR for caffe-trained weights), then (x / 255 - mean) / std per channel in
    that order."""

    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: str = "RGB"

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """As config.json or an export records it; runs from before `channels` existed read back as RGB."""
        return cls(d["size"], d["resize"], d["interpolation"], tuple(d["mean"]), tuple(d["std"]),
                   d.get("channels", "RGB"))


def is_candidate(path: Path) -> bool:
    """An image by its extension, and not hidden or OS junk (.DS_Store, Thumbs.db, AppleDouble `._*`)."""
    name = path.name
    return (
        not name.startswith(".")
        and name.lower() not in JUNK_NAMES
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def find(paths: Iterable[str | Path]) -> list[Path]:
    """Each path named, and for a folder the images below it (sorted; hidden files and folders left out)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_candidate(f)
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            files.append(p)
    return files


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float grey rescaled, transparency composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.uint32)  # 32-bit 'I' is ambiguous: 16-bit data if values say so
        deep = im.mode.startswith("I;16") or arr.max() > 255
        im = Image.fromarray((arr >> 8 if deep else arr).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode `path` fully to upright RGB, or raise BadImage with a short reason.

    `draft` lets JPEG decode at a reduced scale that still covers `draft` pixels per side (much faster for
    photos far larger than the network input).
    """
    if not os.path.isfile(path):
        raise BadImage("file not found")
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():  # the max_pixels check below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise BadImage(
                    f"{width}x{height} pixels exceeds the decompression-bomb limit of {max_pixels:,} (--max-pixels)"
                )
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:  # Pillow's message holds the absolute path; the reason needs none
        raise BadImage("cannot decode: unknown image format or broken header") from None
    except Exception as e:  # Pillow raises many types for broken files; each one is a reason to skip
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"cannot decode: {reason}") from None


def prepare(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """An RGB image as the model takes it: uint8 [3, size, size], resized and cropped as `feeds.transforms` does
    with torchvision (short side to `pre.resize`, antialiased; centre crop, zero-padded if smaller).

    Pillow resamples instead of torchvision, so pixels may differ by a rounding step or two; the tests bound it.
    """
    width, height = im.size
    short, long = sorted((width, height))
    long = int(pre.resize * long / short)  # torchvision's rounding of the long side
    size = (pre.resize, long) if width <= height else (long, pre.resize)
    if size != im.size:
        im = im.resize(size, RESAMPLING[pre.interpolation])
    left, top = _anchor(size[0], pre.size), _anchor(size[1], pre.size)
    return np.asarray(im.crop((left, top, left + pre.size, top + pre.size))).transpose(2, 0, 1).copy()


def _anchor(have: int, want: int) -> int:
    """Where torchvision's CenterCrop starts along one side; negative where it pads (Pillow's crop fills zeros)."""
    return int(round((have - want) / 2.0)) if have >= want else -((want - have) // 2)
