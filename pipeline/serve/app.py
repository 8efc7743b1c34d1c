"""The web app of ``fusioner serve``: one static page, what the run is, and one prediction endpoint.

A request's photo and names go to :meth:`pipeline.eval.predict.Predictor.predict`, the function
behind ``fusioner predict``, which writes its files to a temporary folder; the page gets those
files' bytes back (base64 in JSON), so what it shows and offers for download is what the command
line writes. Predictions run one at a time on a worker thread (a run's model and encoders are
loaded once and are not safe for two threads) while the event loop keeps answering; beyond
``max_waiting`` queued photos the server says it is busy. Every refusal or failure reaches the page
as one line (``{"error": ...}``); tracebacks go to the server's log only.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from pipeline.data.labels import parse_names
from pipeline.errors import UserError
from pipeline.eval.predict import Predictor, decode_photo, prediction_notes

LOG = logging.getLogger("fusioner.serve")

EXAMPLE_NAMES = "person, dog, cat, car, tree, grass, sky"
FORM_SLACK = 64 * 1024  # bytes of a request beside the photo: the names, the mode, multipart headers
DRAIN_FACTOR = 4  # an oversize upload is read (and dropped) up to this many limits, so browsers see the answer


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server."""

    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_waiting: int = 8  # photos queued behind the one being segmented before "busy" is answered
    batch_size: int = 16  # windows encoded at once, as predict --batch-size

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Refused(Exception):
    """A request the page is told about: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PredictionService:
    """The run, loaded once, and the queue in front of it."""

    def __init__(self, *, predictor: Predictor, limits: ServeLimits, title: str):
        self.predictor, self.limits, self.title = predictor, limits, title
        self.lock = threading.Lock()
        self.pending = 0  # requests running or queued; touched by the event loop only

    def info(self) -> dict:
        attrs = self.predictor.attrs
        return {"run": self.title, "pretrained": self.predictor.pretrained, "vision": attrs.get("encoder"),
                "notes": prediction_notes(pretrained=self.predictor.pretrained), "examples": EXAMPLE_NAMES,
                "max_upload_mb": self.limits.max_upload_mb, "max_megapixels": self.limits.max_pixels / 1e6}

    def segment(self, *, data: bytes, filename: str, classes: list[str], resize: bool) -> dict:
        """On a worker thread: one photo at a time through the run's predictor."""
        with self.lock:
            pixels = decode_photo(io.BytesIO(data), name=filename, max_pixels=self.limits.max_pixels)
            with tempfile.TemporaryDirectory(prefix="fusioner-serve-") as tmp:
                summary = self.predictor.predict(pixels=pixels, name=filename, classes=classes, out=tmp,
                                                 resize=resize, batch_size=self.limits.batch_size, quiet=True)
                return _payload(Path(tmp), summary)


def _encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _payload(out: Path, summary: dict) -> dict:
    """The files ``predict`` wrote to ``out``, as the page receives them."""
    return {
        "image": summary["image"], "size": summary["size"], "views": summary["views"],
        "pretrained": summary["pretrained_features"],
        "notes": prediction_notes(pretrained=summary["pretrained_features"]),
        "overlay": _encoded(out / summary["overlay"]), "labels": _encoded(out / summary["labels"]),
        "prediction": (out / "prediction.json").read_text(),
        "masks": [{"name": name, "file": file, "coverage": summary["coverage"][name], "png": _encoded(out / file)}
                  for name, file in summary["masks"].items()],
    }


def read_names(text: str) -> list[str]:
    """The page's class names: comma-separated, at least one, none repeated."""
    names = parse_names(text)
    if not names:
        raise Refused(400, 'type at least one class name, e.g. "cat, sofa"')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise Refused(400, f"a class name is repeated: {repeated[0]}")
    return names


async def _bounded_form(request: Request, limits: ServeLimits):
    """The multipart form of ``request``, refused once its body passes the upload limit."""
    limit = limits.max_upload_bytes + FORM_SLACK
    declared = request.headers.get("content-length", "")
    body, size = bytearray(), 0
    too_large = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        if too_large or size > limit:
            too_large = True
            if size > DRAIN_FACTOR * limit:
                break
            continue
        body += chunk
    if too_large:
        raise Refused(413, f"the upload is {max(size, int(declared or 0)) / 2 ** 20:.1f} MB; this server takes "
                           f"photos up to {limits.max_upload_mb:g} MB")

    async def receive() -> dict:
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return await Request(request.scope, receive).form(max_files=1, max_fields=8)


async def predict_endpoint(request: Request) -> JSONResponse:
    service: PredictionService = request.app.state.service
    limits = service.limits
    form = None
    try:
        form = await _bounded_form(request, limits)
        upload = form.get("photo")
        if upload is None or isinstance(upload, str) or not upload.filename:
            raise Refused(400, "choose a photo to upload")
        data = await upload.read()
        if len(data) > limits.max_upload_bytes:
            raise Refused(413, f"{upload.filename} is {len(data) / 2 ** 20:.1f} MB; this server takes photos up to "
                               f"{limits.max_upload_mb:g} MB")
        if not data:
            raise Refused(400, f"{upload.filename} is empty")
        classes = read_names(str(form.get("names") or ""))
        mode = str(form.get("mode") or "windows")
        if mode not in ("windows", "resize"):
            raise Refused(400, f"mode is windows or resize, not {mode}")
        if service.pending > limits.max_waiting:
            raise Refused(503, f"busy: {service.pending} photos are ahead of this one; try again in a minute")
        service.pending += 1
        try:
            payload = await run_in_threadpool(service.segment, data=data, filename=Path(upload.filename).name,
                                              classes=classes, resize=mode == "resize")
        finally:
            service.pending -= 1
    except Refused as refusal:
        return JSONResponse({"error": refusal.message}, status_code=refusal.status)
    except UserError as err:
        return JSONResponse({"error": str(err)}, status_code=400)
    except HTTPException as err:  # a malformed form, as starlette words it
        return JSONResponse({"error": f"the upload could not be read: {err.detail}"}, status_code=err.status_code)
    except Exception:  # noqa: BLE001 - the page gets one line, the log gets the traceback
        LOG.exception("prediction failed")
        return JSONResponse({"error": "the prediction failed on the server; its log has the details"},
                            status_code=500)
    finally:
        if form is not None:
            await form.close()
    return JSONResponse(payload)


def build_app(*, predictor: Predictor, limits: ServeLimits = ServeLimits(), title: str = "") -> Starlette:
    """The ASGI app over a loaded run: ``/`` the page, ``/api/run`` what it is, ``/api/predict`` a photo."""
    page = resources.files("pipeline.serve").joinpath("page.html").read_text(encoding="utf-8")
    service = PredictionService(predictor=predictor, limits=limits, title=title or Path(str(predictor.checkpoint)).name)

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def run_info(request: Request) -> JSONResponse:
        return JSONResponse(service.info())

    app = Starlette(routes=[Route("/", index), Route("/api/run", run_info),
                            Route("/api/predict", predict_endpoint, methods=["POST"])])
    app.state.service = service
    return app
