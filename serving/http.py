"""HTTP service (``spml-deploy serve``): segmentation and segment retrieval over HTTP.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

* ``POST /v1/segment`` - multipart field ``image`` (PNG, JPEG, BMP, WebP, TIFF). JSON: image size,
  pixels and fraction per class, the label map as a base64 palette PNG (pixel values = class
  ids); ``?format=png`` returns the label map PNG bytes themselves.
* ``POST /v1/query`` - multipart ``image`` plus exactly one of the form fields ``point``
  ("x,y", whole pixels) or ``box`` ("x,y,w,h") or the file ``mask`` (same size as the image;
  non-black pixels are inside), ``k`` (1..max_k), optionally ``class_name`` and ``exclude_self``
  (default true: the query image's own segments are left out when it is in the index). JSON: the
  query segment and the top-k indexed segments (score, image path relative to the indexed
  folder, image id, segment id, box, class). 404 without an index.
* ``GET /healthz`` - model and index summary.

Safety: the request body is limited (``max_upload_bytes``; 413 as soon as the declared or the
received size exceeds it), images are checked from their header before decoding (more than
``max_pixels`` -> 413, decompression bombs), content is validated (not a supported image -> 415,
truncated/corrupt -> 422), out-of-image points/boxes and unknown classes -> 422; every 4xx,
request validation included, is ``{"detail": ..., "fix": ...}``. No endpoint takes a file path:
images come in the request, and hits name indexed images relative to the indexed folder.

Memory: at most ``max_concurrent`` requests read, decode and run the model at once (a
semaphore); up to ``max_queue`` more wait with their upload parsed (Starlette keeps at most
1 MiB of each uploaded file in memory, the rest in a temporary file); beyond that a ``/v1/`` request gets 503
with ``Retry-After`` before its body is parsed (it is read and discarded).
:func:`request_memory_bytes` is what one worst-case request can take. Model work runs in worker
threads (``run_in_threadpool``) behind one lock, so the event loop keeps serving (``/healthz``
answers while a segmentation runs).
"""

import asyncio
import base64
import io
import ipaddress
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from spml_deploy.errors import SpmlError, require
from spml_deploy.data.imageio import encode_label_png, read_image

if TYPE_CHECKING:
    from spml_deploy.engine.bundle import Bundle

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_K = 100
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 8
RETRY_AFTER_S = 1
# Peak memory of one request per pixel of its image, measured with
# ``benchmarks/http_load.py --memory`` (results in benchmarks/results/http_load.md): RGB or grey
# uploads take 6-10 bytes per pixel (the decoder's buffer and the decoded RGB uint8 image; the
# query's segments are computed per cell, not per pixel), RGBA ones 44 (imageio composites the
# alpha in uint32), a mask query with an RGBA image and an RGBA mask 47-50.
WORST_BYTES_PER_PIXEL = 50


def request_memory_bytes(max_pixels: int = DEFAULT_MAX_PIXELS,
                         max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> int:
    """Memory one worst-case request can take: ``WORST_BYTES_PER_PIXEL`` per pixel of the
    largest accepted image, plus the upload twice (the request body and the bytes read from
    it). The service holds at most ``max_concurrent`` such requests at once."""
    return WORST_BYTES_PER_PIXEL * int(max_pixels) + 2 * int(max_upload_bytes)
ALLOWED_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "WEBP": ".webp",
                   "TIFF": ".tif"}


class RequestError(Exception):
    """A client error with its HTTP status (turned into a JSON 4xx by the app)."""

    def __init__(self, status: int, message: str, fix: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.fix = fix


# --------------------------------------------------------------------------------------------
# request body limit (pure ASGI, works with any FastAPI/Starlette version)


class BodyLimitMiddleware:
    """Reject request bodies above ``max_bytes`` with 413: before the app runs when
    ``Content-Length`` says so, else as soon as the received bytes exceed the limit.

    The rest of a rejected body is read and discarded (up to ``drain_bytes``, default 4x the
    limit) before the 413 goes out: a server that closes a socket with unread data makes the
    kernel reset the connection, and the client would see "connection reset" instead of the
    413. Bodies beyond ``drain_bytes`` get the 413 and a closed connection.
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.drain_bytes = int(drain_bytes if drain_bytes is not None else 4 * self.max_bytes)

    async def _drain(self, receive, already: int) -> None:
        await _drain(receive, already, self.drain_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _json_response(send, 400, {
                        "detail": "invalid Content-Length header",
                        "fix": "send a numeric Content-Length, or let the client compute it"})
                    return
        if declared is not None and declared > self.max_bytes:
            if declared <= self.drain_bytes:
                await self._drain(receive, 0)
            await _json_response(send, 413, _too_large(declared, self.max_bytes))
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    from fastapi import HTTPException  # re-raised as is by FastAPI's body parsing

                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    raise HTTPException(413, _too_large(received, self.max_bytes)["detail"])
            return message

        await self.app(scope, limited_receive, send)


class AdmissionMiddleware:
    """At most ``max_active`` requests under ``prefix`` in the service at once (working or
    waiting for a work slot); one more gets 503 with ``Retry-After`` before the app parses its
    body (the body is read and discarded up to ``drain_bytes`` first, as in
    :class:`BodyLimitMiddleware`, so the client sees the 503 and not a reset connection)."""

    def __init__(self, app, max_active: int, drain_bytes: int, prefix: str = "/v1/",
                 retry_after: int = RETRY_AFTER_S):
        self.app = app
        self.max_active = int(max_active)
        self.drain_bytes = int(drain_bytes)
        self.prefix = prefix
        self.retry_after = int(retry_after)
        self.active = 0               # one event loop: no lock needed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_active:
            await _drain(receive, 0, self.drain_bytes)
            await _json_response(send, 503, {
                "detail": f"the service is busy ({self.active} requests in progress or waiting)",
                "fix": f"retry after {self.retry_after} s (Retry-After header), or start the "
                       "service with a larger --max-concurrent / --max-queue"},
                headers=[(b"retry-after", str(self.retry_after).encode())])
            return
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        async def send_and_release(message) -> None:
            # the slot is free once the answer is complete: a client that sends its next
            # request as soon as it has the answer must not find its previous one still
            # counted (FastAPI closes uploads after the response, which can take a while)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()


async def _drain(receive, already: int, limit: int) -> None:
    """Read and discard the rest of a request body, up to ``limit`` bytes in all."""
    total = already
    while total <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large(size: int, limit: int) -> dict[str, Any]:
    return {"detail": f"request body of {size:,} bytes exceeds the limit of {limit:,} bytes",
            "fix": "send a smaller image (downscale or compress it)"}


async def _json_response(send, status: int, body: dict[str, Any],
                         headers: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


# --------------------------------------------------------------------------------------------
# decoding uploads


def decode_upload(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """Uploaded bytes -> RGB uint8 [H, W, 3] with the checks of ``imageio.read_image``.

    Raises :class:`RequestError`: 422 empty, 415 not a supported image, 413 more than
    ``max_pixels`` pixels (read from the header, before decoding), 422 truncated or corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(422, f"the {what} upload is empty", "attach the file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"the {what} is refused as a decompression bomb ({exc})",
                           f"send images of at most {max_pixels:,} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(415, f"the {what} upload is not an image this service reads",
                           f"send {', '.join(sorted(set(ALLOWED_FORMATS)))}") from exc
    if fmt not in ALLOWED_FORMATS:
        raise RequestError(415, f"{what} format {fmt} is not supported",
                           f"send {', '.join(sorted(set(ALLOWED_FORMATS)))}")
    if w * h > max_pixels:
        raise RequestError(413, f"the {what} is {w}x{h} = {w * h:,} pixels, more than the limit "
                                f"of {max_pixels:,}", "downscale the image")
    # read_image (EXIF orientation, 16-bit, alpha, truncation) works on files: a private temp file
    fd, tmp = tempfile.mkstemp(suffix=ALLOWED_FORMATS[fmt], prefix="spml-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_image(tmp, max_pixels=max_pixels)
    except SpmlError as exc:
        raise RequestError(422, f"the {what} cannot be decoded: {exc.message}",
                           "re-encode it as PNG or JPEG") from exc
    finally:
        os.unlink(tmp)


def mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Query mask rule shared with the CLI: non-black pixels are inside (bool [H, W])."""
    return rgb.max(axis=2) > 0


# --------------------------------------------------------------------------------------------
# the service


class Service:
    """The loaded model (a core Pipeline) and optional Retriever, with one lock for model work."""

    def __init__(self, model_path: "str | Path | Bundle", index_dir: str | Path | None = None,
                 backend: str = "torch", device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                 **backend_options: Any):
        """``model_path`` is opened (and verified) once, by the pipeline; the retriever uses
        the pipeline's backend and bundle."""
        from spml_deploy.engine.bundle import load_bundle
        from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline

        self.max_pixels = int(max_pixels)
        bundle = load_bundle(model_path)
        self.pipeline = load_pipeline(bundle, backend=backend, device=device,
                                      options=PipelineOptions(classifier="softmax"),
                                      **backend_options)
        self.retriever = None
        if index_dir is not None:
            from spml_deploy.serving.retrieval import Retriever

            try:
                self.retriever = Retriever(index_dir, bundle, backend_obj=self.pipeline.backend)
            except BaseException:
                self.pipeline.close()
                raise
        self.lock = threading.Lock()
        self.model_path = str(bundle.source or bundle.folder)

    def segment(self, image: np.ndarray):
        with self.lock:
            return self.pipeline.predict([image])[0]

    def query(self, image: np.ndarray, point: str | None, box: str | None,
              mask: np.ndarray | None, k: int, class_name: str | None, exclude_self: bool = True):
        assert self.retriever is not None
        with self.lock:
            return self.retriever.query(image, point=point, box=box, mask=mask, k=k,
                                        class_name=class_name, exclude_self=exclude_self)

    def health(self) -> dict[str, Any]:
        be = self.pipeline.backend
        out: dict[str, Any] = {"status": "ok", "model": {
            "classes": self.pipeline.class_names, "backend": getattr(be, "name", "?"),
            "device": str(getattr(be, "device", "cpu")),
            "embed_dim": getattr(be, "embed_dim", None)}, "index": None}
        if self.retriever is not None:
            info = self.retriever.info()
            out["index"] = {k: info[k] for k in ("segments", "images", "index_type", "embed_dim",
                                                  "flip")}
        return out

    def close(self) -> None:
        if self.retriever is not None:
            self.retriever.store.close()
        self.pipeline.close()


def create_app(model_path: str | Path, index_dir: str | Path | None = None, *,
               backend: str = "torch", device: str = "cpu",
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_k: int = DEFAULT_MAX_K,
               max_concurrent: int = DEFAULT_MAX_CONCURRENT, max_queue: int = DEFAULT_MAX_QUEUE,
               **backend_options: Any):
    """The FastAPI app serving ``model_path`` (run folder or bundle) and optionally the segment
    index ``index_dir``. The model (and index) are loaded here, so errors surface at start-up.

    ``max_concurrent`` requests are read, decoded and run at once, ``max_queue`` more wait,
    further ``/v1/`` requests get 503 + Retry-After (see the module docstring)."""
    require("fastapi", "serve", "the HTTP service")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from spml_deploy import __version__

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                        ("max_k", max_k), ("max_concurrent", max_concurrent)):
        if int(value) < 1:
            raise SpmlError(f"{name} must be at least 1, got {value}",
                            fix=f"give a positive {name}")
    if int(max_queue) < 0:
        raise SpmlError(f"max_queue must be 0 or more, got {max_queue}", fix="e.g. max_queue=8")
    service = Service(model_path, index_dir, backend=backend, device=device,
                      max_pixels=max_pixels, **backend_options)
    work_slots = asyncio.Semaphore(int(max_concurrent))

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="spml-deploy", version=__version__, lifespan=lifespan,
                  description="SPML semantic segmentation and segment retrieval. "
                              f"Uploads up to {max_upload_bytes:,} bytes and "
                              f"{max_pixels:,} pixels.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes)
    app.add_middleware(AdmissionMiddleware, max_active=int(max_concurrent) + int(max_queue),
                       drain_bytes=4 * int(max_upload_bytes))     # outermost: before the limit

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse({"detail": exc.message, "fix": exc.fix}, status_code=exc.status)

    field_fixes = {
        "image": "attach the image file as the multipart field 'image' "
                 "(curl -F image=@photo.jpg ...)",
        "mask": "attach the mask as a file field (curl -F mask=@mask.png ...)",
        "k": f"send k as a whole number from 1 to {max_k}",
        "format": "use ?format=json or ?format=png",
        "exclude_self": "send exclude_self=true or exclude_self=false",
    }

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError):
        problems, fixes = [], []
        for err in exc.errors():
            name = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            text = f"{name or 'request'}: {err.get('msg', 'invalid')}"
            value = err.get("input")
            if isinstance(value, (str, int, float)) and err.get("type") != "missing":
                text += f" (got {str(value)[:60]!r})"
            problems.append(text)
            fix = field_fixes.get(name, "see /docs for the fields of this endpoint")
            if fix not in fixes:
                fixes.append(fix)
        return JSONResponse({"detail": "; ".join(problems) or "invalid request",
                             "fix": "; ".join(fixes) or "see /docs"}, status_code=422)

    status_fixes = {
        400: "send multipart/form-data, e.g. curl -F image=@photo.jpg URL",
        404: "see /docs for the endpoints of this service",
        405: "see /docs for the method of each endpoint",
        413: "send a smaller image (downscale or compress it)",
    }

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail, "fix": status_fixes.get(exc.status_code,
                                                                            "see /docs")},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(SpmlError)
    async def _spml_error(_: Request, exc: SpmlError):
        # the message only: paths in SpmlError are server-side (temporary files, the index)
        return JSONResponse({"detail": exc.message, "fix": exc.fix}, status_code=422)

    async def _image(upload: UploadFile, what: str = "image") -> np.ndarray:
        data = await upload.read()
        return await run_in_threadpool(decode_upload, data, service.max_pixels, what)

    @app.get("/healthz", summary="Liveness and what is loaded")
    async def healthz() -> dict[str, Any]:
        return service.health()

    @app.post("/v1/segment", summary="Segment an uploaded image",
              responses={200: {"content": {"image/png": {}}},
                         413: {"description": "upload or image too large"},
                         415: {"description": "not a supported image"},
                         422: {"description": "corrupt image or bad parameters"}})
    async def segment(image: UploadFile = File(..., description="PNG, JPEG, BMP, WebP or TIFF"),
                      format: str = Query("json", pattern="^(json|png)$",
                                          description="json (class areas + base64 label PNG) "
                                                      "or png (the label map PNG)")):
        async with work_slots:          # upload bytes, decoded image, label map: bounded
            arr = await _image(image)
            pred = await run_in_threadpool(service.segment, arr)
            del arr
            labels = pred.labels
            png = await run_in_threadpool(encode_label_png, labels, service.pipeline.palette)
            if format == "png":
                return Response(content=png, media_type="image/png")
            ids, counts = await run_in_threadpool(np.unique, labels, return_counts=True)
            height, width = labels.shape
            names, timings = pred.class_names, pred.timings
            del labels, pred
        total = float(height * width)
        return {"width": int(width), "height": int(height),
                "classes": [{"id": int(i), "name": names[i] if i < len(names) else str(int(i)),
                             "pixels": int(c), "fraction": round(int(c) / total, 6)}
                            for i, c in zip(ids, counts)],
                "label_png": base64.b64encode(png).decode("ascii"),
                "timings_ms": {k: round(1000 * v, 3) for k, v in timings.items()}}

    @app.post("/v1/query", summary="Segments most similar to a point, box or mask",
              responses={404: {"description": "the service runs without an index"},
                         413: {"description": "upload or image too large"},
                         415: {"description": "not a supported image"},
                         422: {"description": "point/box outside the image, bad parameters"}})
    async def query_endpoint(
            image: UploadFile = File(..., description="the query image"),
            point: str | None = Form(None, description="x,y in image pixels"),
            box: str | None = Form(None, description="x,y,w,h in image pixels"),
            mask: UploadFile | None = File(None, description="mask image, non-black = inside"),
            k: int = Form(10, ge=1, le=max_k, description="number of hits"),
            class_name: str | None = Form(None, description="keep hits of this predicted class"),
            exclude_self: bool = Form(True, description="leave out the query image's own "
                                                        "segments when it is in the index")):
        if service.retriever is None:
            raise RequestError(404, "this service has no segment index",
                               "start it with --index INDEX_DIR (spml-deploy index build first)")
        if sum(v is not None for v in (point, box, mask)) != 1:
            raise RequestError(422, "give exactly one of point, box or mask",
                               "e.g. point=120,80 or box=100,60,40,40")
        async with work_slots:          # upload bytes, decoded image and mask: bounded
            arr = await _image(image)
            mask_arr = None
            if mask is not None:
                mask_arr = mask_from_rgb(await _image(mask, "mask"))
            hits, desc = await run_in_threadpool(service.query, arr, point, box, mask_arr, k,
                                                 class_name, exclude_self)
            del arr, mask_arr
        return {"query": desc, "k": k, "hits": [h.to_dict() for h in hits]}

    return app


def serve(model_path: str | Path, index_dir: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", threads: int | None = None,
          announce: Callable[[str, int], None] | None = None, **app_options: Any) -> None:
    """Run the service with uvicorn until interrupted (``app_options`` go to :func:`create_app`).

    ``threads``: torch intra-op threads for the model work (default: torch's, one per CPU). On a
    small shared CPU, 1 leaves a core to the HTTP side and avoids thread contention.
    ``announce``: called with the service's URL and the memory its requests can take at most
    (:func:`request_memory_bytes` x ``max_concurrent``) once the model and index are loaded (an
    error in them is raised before anything is announced).
    """
    if not 1 <= int(port) <= 65535:
        raise SpmlError(f"port {port} is not a TCP port", fix="choose a port from 1 to 65535")
    uvicorn = require("uvicorn", "serve", "the HTTP service")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: the service has no authentication; anyone who can reach this "
                    "address can use the model (and see indexed image paths)", host)
    app = create_app(model_path, index_dir, **app_options)
    if announce is not None:
        per_request = request_memory_bytes(app_options.get("max_pixels", DEFAULT_MAX_PIXELS),
                                           app_options.get("max_upload_bytes",
                                                           DEFAULT_MAX_UPLOAD_BYTES))
        slots = int(app_options.get("max_concurrent", DEFAULT_MAX_CONCURRENT))
        announce(f"http://{host}:{int(port)}", per_request * slots)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)
