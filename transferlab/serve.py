"""A local web page and JSON API over a run directory or an exported ONNX file (FastAPI + uvicorn).

    GET  /              the page: drop or pick photos; label, top classes and (run directories) Grad-CAM each
    GET  /api/health    {"status": "ok"}
    GET  /api/model     the model card
    POST /api/predict   multipart field `files`, one or more images -> the rows `transferlab predict --json` prints,
                        with `path` the uploaded file's name; `?top_k=K` as `--top-k K`
    POST /api/gradcam   multipart field `file`, one image -> PNG: the image as the model sees it, Grad-CAM over it
    GET  /report        the comparison report the run directory belongs to, when there is one

Uploads are bounded (bytes per file and per request, files per request); every refusal is a 4xx JSON
`{"error": ...}` that names the problem, and the server goes on serving. What is uploaded is written only to a
temporary directory that is removed before the answer leaves. An ONNX file is served without torch.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import images, predictions
from .config import UploadLimits
from .exported import ExportedModel

MB = 2**20


class Refused(Exception):
    """A request the server will not answer with a prediction: an HTTP status and the reason, in one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _TooLarge(Exception):
    """The request's body passed its limit as it arrived."""


def create_app(source: str | Path, limits: UploadLimits = UploadLimits()) -> FastAPI:
    """The page and API over `source`: a run directory (PyTorch, with Grad-CAM) or an exported .onnx file."""
    model = predictions.load(source)
    report = None if isinstance(model, ExportedModel) else _report(model.path)
    card = model.card | {"gradcam": not isinstance(model, ExportedModel), "report": "/report" if report else None,
                         "limits": {"file_mb": limits.file_mb, "request_mb": limits.request_mb, "files": limits.files}}
    lock = threading.Lock()  # one prediction at a time: the model's own threads already use every core
    page = resources.files(__package__).joinpath("serve.html").read_text()
    app = FastAPI(title="transferlab", docs_url=None, redoc_url=None, openapi_url=None)

    def predict(paths: list[Path], top_k: int | None) -> list[dict]:
        with lock:
            return model.predict(paths, top_k)

    def gradcam(paths: list[Path]) -> bytes:
        with lock:
            return _gradcam_png(model, paths[0])

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405, a malformed form
        return JSONResponse({"error": str(e.detail)}, e.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_card() -> dict:
        return card

    @app.post("/api/predict")
    async def predict_files(request: Request) -> JSONResponse:
        top_k = _top_k(request.query_params.get("top_k"))
        return JSONResponse(await _answer(request, "files", limits, lambda paths: predict(paths, top_k), _rows))

    @app.post("/api/gradcam")
    async def gradcam_file(request: Request) -> Response:
        if not card["gradcam"]:
            raise Refused(404, "Grad-CAM needs the run directory; this server runs an exported ONNX file")
        return Response(await _answer(request, "file", limits, gradcam), media_type="image/png")

    @app.get("/report")
    async def comparison_report() -> FileResponse:
        if report is None:
            raise Refused(404, "this model is not part of a comparison with a report")
        return FileResponse(report)

    return app


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000,
          limits: UploadLimits = UploadLimits()) -> None:
    """Serve until Ctrl-C."""
    app = create_app(source, limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"transferlab: warning: listening on {host}: whoever can reach this machine can use the model",
              file=sys.stderr)
    print(f"serving {source} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=64)


@contextlib.contextmanager
def background(source: str | Path, host: str = "127.0.0.1", port: int = 0,
               limits: UploadLimits = UploadLimits()) -> Iterator[str]:
    """Serve from a thread of this process (a notebook's, a test's) while the block runs; yields the page's URL.
    Port 0 picks a free one. The server is shut down on leaving the block, whatever happened in it."""
    server = uvicorn.Server(uvicorn.Config(create_app(source, limits), host=host, port=port, log_level="warning",
                                           limit_concurrency=64))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{host}:{bound[1]}/"
    finally:
        server.should_exit = True
        thread.join(30)


def _report(run_dir: Path | None) -> Path | None:
    """The comparison report beside a run directory that `compare` wrote."""
    if run_dir is None:
        return None
    report = run_dir.parent / "report.html"
    return report if report.is_file() and (run_dir.parent / "comparison.json").is_file() else None


async def _answer(request: Request, field: str, limits: UploadLimits, use: Callable[[list[Path]], object],
                  check: Callable[[list[str], object], object] = lambda names, answer: answer):
    """`use` the images of the form's `field`, written to a temporary directory that is removed afterwards."""
    uploads = await _uploads(request, field, limits)
    names = [u.filename for u in uploads]

    def run():
        with tempfile.TemporaryDirectory(prefix="transferlab-upload-") as tmp:
            paths = [Path(tmp) / str(i) for i in range(len(uploads))]  # never the uploaded names
            for upload, path in zip(uploads, paths):
                with path.open("wb") as f:
                    shutil.copyfileobj(upload.file, f)
            try:
                return check(names, use(paths))
            except images.BadImage as e:  # Grad-CAM's one image; `predict` answers rows with errors instead
                raise Refused(422, f"{names[0]}: {e}") from None

    try:
        return await run_in_threadpool(run)
    finally:
        for upload in uploads:
            await upload.close()


def _top_k(value: str | None) -> int | None:
    """The query's `top_k`, as `predict --top-k` takes it (default: predict's)."""
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise Refused(400, f"top_k must be a positive whole number, got {value!r}")
    return int(value)


def _rows(names: list[str], rows: list[dict]) -> list[dict]:
    """`predict`'s rows with the uploaded names as paths; a file that is not a usable image refuses them all."""
    for name, row in zip(names, rows):
        if "error" in row:
            raise Refused(422, f"{name}: {row['error']}")
        row["path"] = name
    return rows


async def _uploads(request: Request, field: str, limits: UploadLimits) -> list[UploadFile]:
    """The files in the multipart form's `field`, within `limits`; anything else is Refused."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, f"send images as multipart/form-data in the field '{field}'")
    most = int(limits.request_mb * MB)
    try:
        if int(request.headers.get("content-length", 0)) > most:
            raise Refused(413, f"the request is larger than {limits.request_mb:g} MB (--max-request-mb)")
    except ValueError:
        raise Refused(400, "the Content-Length header is not a number") from None
    try:
        form = await Request(request.scope, _bounded(request.receive, most)).form(
            max_files=limits.files, max_fields=limits.files)
    except _TooLarge:
        raise Refused(413, f"the request is larger than {limits.request_mb:g} MB (--max-request-mb)") from None
    try:
        if unexpected := sorted(set(form.keys()) - {field}):
            raise Refused(400, f"unexpected form field {unexpected[0]!r}: send images in the field '{field}'")
        uploads = form.getlist(field)
        if not uploads:
            raise Refused(400, f"no images: the form's field '{field}' is missing or empty")
        if not all(isinstance(u, UploadFile) for u in uploads):
            raise Refused(400, f"the field '{field}' must hold files, not text")
        if len(uploads) > 1 and field == "file":
            raise Refused(400, f"send one image in the field '{field}'")
        for upload in uploads:
            _check_upload(upload, limits)
    except Refused:
        await form.close()
        raise
    return uploads


def _check_upload(upload: UploadFile, limits: UploadLimits) -> None:
    name = upload.filename
    if not name:
        raise Refused(400, "a file in the form has no name")
    if (len(name.encode("utf-8", "replace")) > 255 or name in (".", "..") or "/" in name or "\\" in name
            or any(unicodedata.category(c) == "Cc" for c in name)):
        raise Refused(400, f"odd file name {name!r}: give a plain name, without folders or control characters, "
                           "of at most 255 bytes")
    if upload.size is not None and upload.size > limits.file_mb * MB:
        raise Refused(413, f"{name} is larger than {limits.file_mb:g} MB (--max-file-mb)")


def _bounded(receive, most: int):
    """`receive` that raises _TooLarge once the body passes `most` bytes (a request without Content-Length)."""
    seen = 0

    async def bounded():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > most:
            raise _TooLarge
        return message

    return bounded


def _gradcam_png(run, path: Path) -> bytes:
    """The image as the run's model sees it, with its Grad-CAM heatmap blended over it, as PNG."""
    from matplotlib import colormaps

    from . import feeds
    from .plots import grad_cam

    pre = run.preprocessing
    image = feeds.transforms(pre)(images.load_image(path, run.config.max_pixels, draft=pre.resize))
    cam = grad_cam(run.model, image[None])[0][0]
    heat = colormaps["jet"](cam)[..., :3] * 255
    blended = (0.6 * image.permute(1, 2, 0).numpy() + 0.4 * heat).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(blended).save(out, format="PNG")
    return out.getvalue()
