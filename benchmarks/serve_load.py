"""Load test of `transferlab serve` on loopback: concurrent clients each send one photo per request, and every
answer must be exactly what `transferlab predict --json` prints for that photo (its path the photo's name).
Prints p50/p95 latency and requests/s, and for scale the latency of one client alone (20 requests first).
The clients run in this process beside the server, on the same cores.

    .venv/bin/python benchmarks/serve_load.py MODEL [--photos DIR] [--clients 8] [--requests 50]

MODEL is a run directory or an exported .onnx file. Photos: DIR, else the shared cats-vs-dogs validation photos
when present, else synthetic 500x375 JPEGs. The server listens on 127.0.0.1 only and is shut down at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from transferlab import images, predictions, serve

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cats-vs-dogs" / "validation"


def expected_rows(model: str | Path, photos: list[Path]) -> list[dict]:
    """What `predict --json` prints for each photo alone, with the photo's name as its path."""
    loaded = predictions.load(model)
    return [loaded.predict([p])[0] | {"path": p.name} for p in photos]


def hammer(url: str, photos: list[Path], expected: list[dict], clients: int = 8,
           requests: int = 50) -> tuple[list[float], list[str]]:
    """(seconds per request, what went wrong) for `clients` threads sending `requests` photos each."""

    def client(k: int) -> tuple[list[float], list[str]]:
        latencies, wrong = [], []
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(requests):
                n = (k * requests + i) % len(photos)
                body = {"files": (photos[n].name, photos[n].read_bytes(), "image/jpeg")}
                began = time.perf_counter()
                answer = http.post("/api/predict", files=body)
                latencies.append(time.perf_counter() - began)
                if answer.status_code != 200 or answer.json() != [expected[n]]:
                    wrong.append(f"{photos[n].name}: {answer.status_code} {answer.text[:200]}")
        return latencies, wrong

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return [t for r in results for t in r[0]], [w for r in results for w in r[1]]


def synthetic_photos(folder: Path, count: int = 16) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        paths.append(folder / f"photo {i}.jpg")
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--photos", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.photos or (SHARED if SHARED.is_dir() else None)
        photos = images.find([folder]) if folder else synthetic_photos(Path(tmp))
        photos = photos[:: max(1, len(photos) // (args.clients * args.requests))]
        expected = expected_rows(args.model, photos)
        with serve.background(args.model) as url:
            alone, wrong_alone = hammer(url, photos, expected, 1, 20)
            began = time.perf_counter()
            latencies, wrong = hammer(url, photos, expected, args.clients, args.requests)
            seconds = time.perf_counter() - began
    ms, alone = np.array(latencies) * 1000, np.array(alone) * 1000
    wrong += wrong_alone
    print(f"{args.model}: {len(ms)} requests from {args.clients} clients, {len(photos)} distinct photos "
          f"({'synthetic' if not folder else folder})")
    print(f"latency p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms; "
          f"{len(ms) / seconds:.1f} requests/s; answers equal to predict's: {len(ms) - len(wrong)}/{len(ms)}")
    print(f"one client alone, 20 requests: p50 {np.percentile(alone, 50):.1f} ms, "
          f"p95 {np.percentile(alone, 95):.1f} ms")
    for w in wrong[:5]:
        print("wrong:", w)
    raise SystemExit(1 if wrong else 0)


if __name__ == "__main__":
    main()
