"""`transferlab serve`: the JSON API answers as `predict` does, holds up under load and bad input, keeps nothing.

Every server here listens on 127.0.0.1 only, and is shut down when its test (or module) ends.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import tempfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from transferlab import cli, serve
from transferlab.images import UploadLimits

from .conftest import SHARED

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARKS / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_load = _load_benchmark()


@pytest.fixture(scope="module")
def onnx_url(deployed):
    with serve.background(deployed.path / "model.onnx", limits=UploadLimits(file_mb=1, request_mb=2, files=4)) as url:
        yield url


@pytest.fixture(scope="module")
def run_url(deployed):
    with serve.background(deployed.path) as url:
        yield url


def photos_of(deployed) -> list[Path]:
    return sorted(Path(deployed.config.data).rglob("*.jpg"))


def upload(path: Path, name: str | None = None) -> tuple:
    return "files", (name or path.name, path.read_bytes(), "image/jpeg")


def test_api_answers_what_predict_prints(deployed, onnx_url, run_url, capsys):
    a, b = photos_of(deployed)[:2]
    for source, url in ((deployed.path / "model.onnx", onnx_url), (deployed.path, run_url)):
        assert cli.main(["predict", str(source), str(a), str(b), "--json"]) == 0
        printed = [row | {"path": Path(row["path"]).name} for row in json.loads(capsys.readouterr().out)]
        answer = httpx.post(url + "api/predict", files=[upload(a), upload(b)])
        assert answer.status_code == 200 and answer.json() == printed
    assert cli.main(["predict", str(deployed.path), str(a), "--top-k", "2", "--json"]) == 0
    printed = [row | {"path": a.name} for row in json.loads(capsys.readouterr().out)]
    answer = httpx.post(run_url + "api/predict?top_k=2", files=[upload(a)])
    assert answer.json() == printed and len(printed[0]["top"]) == 2
    assert httpx.get(onnx_url + "api/health").json() == {"status": "ok"}
    card = httpx.get(run_url + "api/model").json()
    assert card["backbone"] == "mobilenetv2_100" and card["classes"] == ["cats", "dogs"] and card["gradcam"]
    assert card["validation"]["accuracy"] == deployed.metrics["accuracy"] and card["report"] is None
    assert not httpx.get(onnx_url + "api/model").json()["gradcam"]
    page = httpx.get(onnx_url)
    assert page.status_code == 200 and 'id="picker"' in page.text


def test_gradcam_is_a_png_of_the_models_input_from_a_run_directory(deployed, onnx_url, run_url):
    photo = photos_of(deployed)[0]
    answer = httpx.post(run_url + "api/gradcam", files=[("file", (photo.name, photo.read_bytes()))])
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (32, 32)
    answer = httpx.post(onnx_url + "api/gradcam", files=[("file", (photo.name, photo.read_bytes()))])
    assert answer.status_code == 404 and "needs the run directory" in answer.json()["error"]


def raw_upload(filename: bytes, content: bytes) -> dict:
    """A multipart request with the file name as given (httpx would percent-encode control characters)."""
    body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + content + b"\r\n--b--\r\n")
    return dict(headers={"content-type": "multipart/form-data; boundary=b"}, content=body)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_goes_on(deployed, onnx_url, monkeypatch,
                                                                             tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the server's uploads would stay behind
    photo = photos_of(deployed)[0]
    jpeg = photo.read_bytes()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big, "PNG")
    assert 1 * 2**20 < len(big.getvalue()) < 2 * 2**20
    api = onnx_url + "api/predict"
    cases = [
        ("non-image file", dict(files=[("files", ("notes.jpg", b"just some text"))]), 422, "notes.jpg: cannot decode"),
        ("truncated JPEG", dict(files=[("files", ("cut.jpg", jpeg[: len(jpeg) // 2]))]), 422, "cut.jpg: cannot decode"),
        ("empty file", dict(files=[("files", ("empty.jpg", b""))]), 422, "empty.jpg: empty file"),
        ("decompression bomb", dict(files=[("files", ("bomb.png", png_header_only(20000, 20000)))]), 422,
         "bomb.png: decompression bomb"),
        ("file over the per-file limit", dict(files=[("files", ("big.png", big.getvalue()))]), 413,
         "big.png is larger than 1 MB (--max-file-mb)"),
        ("request over the limit", dict(files=[("files", ("a.jpg", b"\xff" * 2**21))]), 413,
         "the request is larger than 2 MB"),
        ("request over the limit, sent without its length",
         dict(headers={"content-type": "multipart/form-data; boundary=b"},
              content=iter([b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n']
                           + [b"\xff" * 2**20] * 3)), 413,
         "the request is larger than 2 MB"),
        ("too many files", dict(files=[upload(photo)] * 5), 400, "Too many files"),
        ("wrong field", dict(files=[("image", (photo.name, jpeg))]), 400, "unexpected form field 'image'"),
        ("text in the files field", dict(files=[("files", (None, b"cat.jpg"))]), 400, "must hold files, not text"),
        ("empty request", dict(headers={"content-type": "multipart/form-data; boundary=x"}, content=b""), 400,
         "no images"),
        ("top_k not a number", dict(files=[upload(photo)], params={"top_k": "all"}), 400,
         "top_k must be a positive whole number, got 'all'"),
        ("not a form", dict(json={"files": ["cat.jpg"]}), 415, "send images as multipart/form-data"),
        ("path in the file name", dict(files=[upload(photo, "../../etc/passwd")]), 400, "odd file name"),
        ("control character in the file name", raw_upload(b"a\x07b.jpg", jpeg), 400, "odd file name 'a\\x07b.jpg'"),
        ("file name over 255 bytes", dict(files=[upload(photo, "é" * 200 + ".jpg")]), 400, "odd file name"),
        ("malformed multipart", dict(headers={"content-type": "multipart/form-data; boundary=x"},
                                     content=b"--x\r\nContent-Disposition: form-data\r\n\r\nhalf"), 400, ""),
    ]
    for kind, request, status, message in cases:
        answer = httpx.post(api, **request)
        assert answer.status_code == status and message in answer.json()["error"], (kind, answer.text)
    assert httpx.get(api).status_code == 405 and httpx.get(onnx_url + "nowhere").json()["error"] == "Not Found"
    good = httpx.post(api, files=[upload(photo, "chat été 🐱.jpg")])
    assert good.status_code == 200 and good.json()[0]["path"] == "chat été 🐱.jpg"
    assert list(tmp_path.iterdir()) == []


def test_load_of_8_clients_gets_every_answer_right(deployed, onnx_url, tmp_path):
    """8 concurrent clients x 50 requests, real photos when the shared ones are here (benchmarks/serve_load.py
    prints the latencies)."""
    folder = SHARED / "validation"
    photos = sorted(folder.rglob("*.jpg"))[::5] if folder.is_dir() else serve_load.synthetic_photos(tmp_path)
    expected = serve_load.expected_rows(deployed.path / "model.onnx", photos)
    latencies, wrong = serve_load.hammer(onnx_url, photos, expected, clients=8, requests=50)
    assert len(latencies) == 400 and wrong == []
