"""A dirty image folder, as scraped or half-copied data looks: broken files next to valid but unusual ones,
and OS junk. Each file's expected fate is returned, so tests assert it rather than "it ran"."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
WHITE = (255, 255, 255)


@dataclass
class Dirty:
    """Paths relative to the folder root: `good` must be kept, `bad` skipped (value: a word its reason
    must contain), `junk` neither; `pixels` are expected first-pixel colours of some good files after decoding,
    `sizes` their upright (width, height)."""

    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    junk: list[str] = field(default_factory=list)
    pixels: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and header that claim `width` x `height` RGB pixels, and no pixel data."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def make_dirty(root: Path, seed: int = 0) -> Dirty:
    """Add unusual-but-valid images, broken files and junk to the class folders `cats` and `dogs` of `root`."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    dirty = Dirty()

    def put(rel: str, content: bytes | Image.Image, fate: str = "good", **options) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(path, **options)
        else:
            path.write_bytes(content)
        if fate == "good":
            dirty.good.append(rel)
        elif fate == "junk":
            dirty.junk.append(rel)
        else:
            dirty.bad[rel] = fate

    put("cats/cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=100)
    dirty.pixels["cats/cmyk.jpg"] = RED
    transparent = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    put("cats/rgba.png", transparent)
    dirty.pixels["cats/rgba.png"] = WHITE
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    put("cats/palette.gif", palette)
    dirty.pixels["cats/palette.gif"] = RED
    put("cats/photo.webp", noise, lossless=True)
    put("cats/bitmap.bmp", Image.new("RGB", (40, 30), RED))
    dirty.pixels["cats/bitmap.bmp"] = RED
    put("cats/deep.png", Image.fromarray(np.full((30, 40), 32896, np.uint16)))  # 16-bit grey at 50.2%
    dirty.pixels["cats/deep.png"] = (128, 128, 128)
    put("cats/deep-dark.png", Image.fromarray(np.full((30, 40), 200, np.uint16)))  # 16-bit, not 8-bit 200
    dirty.pixels["cats/deep-dark.png"] = (0, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored sideways, shown rotated 90 degrees clockwise
    put("cats/rotated.jpg", Image.new("RGB", (40, 20), RED), exif=exif)
    dirty.sizes["cats/rotated.jpg"] = (20, 40)
    put("cats/dot.png", Image.new("RGB", (1, 1), RED))
    dirty.sizes["cats/dot.png"] = (1, 1)
    put("cats/huge.jpg", Image.new("RGB", (6000, 4000), RED), quality=50)
    dirty.sizes["cats/huge.jpg"] = (6000, 4000)
    put("cats/nested/deeper/inner.jpg", noise)
    put("cats/Überraschung mit Leerzeichen 猫.jpg", noise)
    put("dogs/UPPER.JPG", noise)
    put("dogs/Scan.TIFF", noise)
    put("dogs/grey.PNG", noise.convert("L"))

    whole = _jpeg(noise)
    put("cats/empty.jpg", b"", "empty")
    put("cats/truncated.jpg", whole[: len(whole) // 2], "truncated")
    put("cats/header-only.jpg", whole[: whole.index(b"\xff\xda") + 14], "truncated")  # headers, no scan data
    put("dogs/header-only.png", png_header(40, 30), "broken header")
    put("dogs/page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "unknown image format")
    put("dogs/random.png", rng.bytes(2048), "unknown image format")
    put("dogs/bomb.png", png_header(40_000, 40_000) + _png_chunk(b"IEND", b""), "decompression bomb")
    put("dogs/big-bomb.png", png_header(10_000, 10_000) + _png_chunk(b"IEND", b""), "decompression-bomb limit")

    put(".DS_Store", rng.bytes(64), "junk")
    put("cats/.DS_Store", rng.bytes(64), "junk")
    put("cats/Thumbs.db", rng.bytes(64), "junk")
    put("dogs/desktop.ini", b"[.ShellClassInfo]", "junk")
    put("cats/._cmyk.jpg", rng.bytes(64), "junk")  # macOS AppleDouble companion
    put("cats/.hidden/peek.jpg", noise, "junk")
    put(".thumbnails/cats.jpg", noise, "junk")
    put("dogs/notes.txt", b"scraped from the web", "junk")
    return dirty


def checksum(root: Path) -> str:
    """Every file and folder under `root`, hidden ones included: names, bytes and modification times."""
    h = hashlib.sha256()
    for dirpath, _, filenames in sorted(os.walk(root)):
        h.update(os.path.relpath(dirpath, root).encode())
        for name in sorted(filenames):
            path = Path(dirpath) / name
            h.update(name.encode() + path.read_bytes() + str(path.stat().st_mtime_ns).encode())
    return h.hexdigest()
