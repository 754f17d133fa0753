"""``mammut serve``: a FastAPI app over a :class:`SearchIndex` and an :class:`Encoder`.

    GET  /                         the search page (plain HTML + JS)
    GET  /api/info                 the index: size, model, index kind, limits
    GET  /api/search?q=TEXT&k=10   text -> nearest images
    POST /api/search/image         an uploaded image (form field ``file``, query ``k``) -> nearest images
    GET  /api/images/{id}          an indexed image's bytes, by id only
    POST /api/images/{id}/caption  a generated caption of an indexed image
    POST /api/caption              a generated caption of an uploaded image
    GET  /api/images/{id}/locate?q=TEXT
                                   where the text is in an indexed image: boxes and scores
                                   (a model that finds text in images: an open-vocabulary detector)
    GET  /openapi.json, /docs      the API's schema and its documentation page

Bad input is a 4xx with ``{"detail": "..."}`` naming the parameter: an empty query, ``k``
outside ``[1, max_k]`` (422), an upload that is not an image (400) or is larger than
``max_upload_bytes`` (413), an unknown id (404), an indexed file that changed since it was
indexed (410: a symbolic link now, replaced, modified, no longer an image; it is never sent),
a request body that stalls for more than ``body_timeout`` seconds (408, and the connection is
closed), ``locate`` asked of a model that finds no text in images (400; ``/api/info``'s
``locate`` says whether it does, and the page asks only then). Model calls run in FastAPI's
thread pool, one at a time per model; the event loop keeps answering meanwhile.

The ``Host`` header must name an allowed host (:func:`default_allowed_hosts`); an IPv6 literal
is written in brackets there (``[::1]:8000``) and matched without them.
"""

from __future__ import annotations

import asyncio
import collections
import io
import ipaddress
import logging
import re
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Path as PathParam, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.datasets import ImageDecodeError, decode_image
from .collection import ItemChanged, is_video
from .encoder import Encoder
from .page import PAGE
from .searcher import DEFAULT_MAX_K, SearchIndex, check_k

log = logging.getLogger(__name__)

__all__ = ["create_app", "default_allowed_hosts", "host_of", "DEFAULT_MAX_UPLOAD", "DEFAULT_BODY_TIMEOUT"]

DEFAULT_MAX_UPLOAD = 10 * 2**20
DEFAULT_BODY_TIMEOUT = 10.0  # seconds a request body may stall between two of its parts
MAX_PIXELS = 40_000_000  # an upload decoding to more pixels than this is refused before decoding
FORM_OVERHEAD = 64 * 1024  # what a multipart request may carry besides the file itself
MAX_ID = 2**63 - 1  # ids are SQLite integers


def default_allowed_hosts(host: str = "127.0.0.1") -> list[str]:
    """The ``Host`` headers the server answers: this machine's names, and ``host`` (what it binds).
    Any other name is refused (400), so a page of another site cannot reach the server through a
    DNS name rebound to this machine. Binding all interfaces (``0.0.0.0``/``::``) allows any name."""
    host = _bare(host)
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(dict.fromkeys(["127.0.0.1", "localhost", "::1", host]))


def _bare(host: str) -> str:
    """A host name as compared: lower case, an IPv6 literal without brackets, in its short form."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    return host


_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-fA-F:.]+(?:%[A-Za-z0-9._~-]+)?)\]"  # [IPv6 literal]
                   r"|(?P<name>[^\s:\[\]/@?#]+))"  # or a name / IPv4 address
                   r"(?::(?P<port>[0-9]{1,5}))?")


def host_of(header: str | None) -> str | None:
    """The host a ``Host`` header names (``[::1]:8000`` -> ``::1``, ``Example.org`` ->
    ``example.org``), or None when it is not a valid ``Host`` header."""
    m = _HOST.fullmatch(header or "")
    if m is None:
        return None
    if m["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(m["v6"]))
        except ValueError:
            return None
    return m["name"].lower()


class _TrustedHost:
    """Answer 400 to a request whose ``Host`` header names no allowed host (``*``: any;
    ``*.example.org``: its subdomains). Unlike Starlette's, it reads ``[::1]:8000`` as ``::1``."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.any = "*" in allowed_hosts
        self.hosts = {_bare(h) for h in allowed_hosts if not h.startswith("*.")}
        self.suffixes = tuple(h.lower()[1:] for h in allowed_hosts if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = [v for k, v in scope["headers"] if k == b"host"]
        host = host_of(raw[0].decode("latin-1")) if len(raw) == 1 else None
        if host is not None and (host in self.hosts or (self.suffixes and host.endswith(self.suffixes))):
            await self.app(scope, receive, send)
            return
        await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)


class _BodyTooLarge(HTTPException):
    pass


class _BodyStalled(HTTPException):
    pass


class _BodyLimit:
    """Refuse a POST whose body is over ``limit`` bytes with a 413: the declared Content-Length at
    once, and the bytes actually received as they arrive (a chunked upload declares none), before
    the multipart parser spools more than ``limit`` of them anywhere. A body whose next part does
    not arrive within ``timeout`` seconds is answered 408 and its connection closed (uvicorn
    has no such timeout: a stalled upload would hold its connection and a worker for ever)."""

    def __init__(self, app: ASGIApp, limit: int, detail: str, timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        self.app, self.limit, self.detail, self.timeout = app, limit, detail, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send, f"a request of {int(length)} bytes")
            return
        received = 0
        started = False
        complete = False
        stalled = (f"request body: expected its next part within {self.timeout:g} seconds, got none; "
                   f"the connection is closed")

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what comes now is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:  # an HTTPException, as below
                raise _BodyStalled(408, stalled, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:  # an HTTPException: FastAPI's body parsing lets it through
                    raise _BodyTooLarge(413, f"{self.detail}, got a request of more than {self.limit} bytes")
            else:
                complete = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:  # read outside a route (its handler answers it there)
            if started:
                raise
            await self._refuse(scope, receive, send, f"a request of more than {self.limit} bytes")
        except _BodyStalled as exc:
            if started:
                raise
            await JSONResponse({"detail": exc.detail}, status_code=408,
                               headers={"Connection": "close"})(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, got: str) -> None:
        await JSONResponse({"detail": f"{self.detail}, got {got}"}, status_code=413,
                           headers={"Connection": "close"})(scope, receive, send)


class ResultModel(BaseModel):
    id: int
    name: str
    caption: str | None
    width: int | None
    height: int | None
    score: float
    image_url: str


class SearchResponse(BaseModel):
    query: str
    k: int
    results: list[ResultModel]


class CaptionResponse(BaseModel):
    id: int | None
    caption: str


class InfoResponse(BaseModel):
    size: int
    dim: int
    model: str
    index: str
    max_k: int
    max_upload_bytes: int
    locate: bool  # whether /api/images/{id}/locate finds text queries (an open-vocabulary detector)


class LocatedBox(BaseModel):
    score: float
    box: list[float]  # x0, y0, x1, y1 in the image's pixels (as it is shown: EXIF orientation applied)


class LocateResponse(BaseModel):
    id: int
    query: str
    width: int
    height: int
    boxes: list[LocatedBox]


MAX_BOXES = 100  # the most boxes a locate request may ask for


def _results(hits: list[Any]) -> list[ResultModel]:
    return [ResultModel(**h.public(), image_url=f"/api/images/{h.record.id}") for h in hits]


def create_app(index: SearchIndex, encoder: Encoder, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_k: int = DEFAULT_MAX_K, caption_cache: int = 4096,
               allowed_hosts: list[str] | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The web app (see the module doc). ``allowed_hosts``: the ``Host`` names answered (default:
    :func:`default_allowed_hosts`; a request naming another gets a 400). ``body_timeout``: the
    seconds a request body may stall before a 408."""
    if max_upload_bytes < 1:
        raise ValueError(f"--max-upload-mb: expected a size > 0, got {max_upload_bytes} bytes")
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)) or not body_timeout > 0:
        raise ValueError(f"--body-timeout: expected a number of seconds > 0, got {body_timeout!r}")
    if max_k < 1:
        raise ValueError(f"--max-k: expected an int >= 1, got {max_k}")
    app = FastAPI(title="mammut search", version="1",
                  description=f"Search and caption the {index.size} images of {index.folder.root.name}.")
    hosts = default_allowed_hosts() if allowed_hosts is None else list(allowed_hosts)
    if not hosts:
        raise ValueError("allowed_hosts: expected at least one host name, got []")
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD,  # type: ignore[arg-type]
                       detail=f"file: expected an image of at most {max_upload_bytes} bytes",
                       timeout=float(body_timeout))
    app.add_middleware(_TrustedHost, allowed_hosts=hosts)  # type: ignore[arg-type]  # outermost: checked first
    captions: collections.OrderedDict[int, str] = collections.OrderedDict()
    located: collections.OrderedDict[tuple[int, str, float, int], LocateResponse] = collections.OrderedDict()
    cache_lock = threading.Lock()
    can_locate = bool(getattr(encoder, "can_locate", False))

    def gone(image_id: int, exc: Exception) -> HTTPException:
        """410 for an indexed image that cannot be served (the reason, with paths, stays in the log)."""
        log.warning("image %d not served: %s", image_id, exc)
        if isinstance(exc, ItemChanged):
            return HTTPException(410, f"id: image {image_id} is not the file that was indexed (it was replaced, "
                                      f"modified or linked elsewhere since); rebuild the index with `mammut index` "
                                      f"to serve the file there now")
        return HTTPException(410, f"id: image {image_id} is no longer readable")

    def k_of(k: int) -> int:
        try:
            return check_k(k, max_k)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    async def read_upload(file: UploadFile) -> Image.Image:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"file: expected an image of at most {max_upload_bytes} bytes, got more")
        if not data:
            raise HTTPException(400, "file: expected an image file, got an empty upload")
        return await run_in_threadpool(decode_upload, data, file.filename or "an upload")

    def decode_upload(data: bytes, filename: str) -> Image.Image:  # in the thread pool: not on the event loop
        try:
            with Image.open(io.BytesIO(data)) as probe:  # header only: refuse pixel bombs before decoding
                w, h = probe.size
        except Image.DecompressionBombError:
            raise HTTPException(413, f"file: expected an image of at most {MAX_PIXELS} pixels, got more") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise HTTPException(400, f"file: expected an image file (PNG, JPEG, WebP, ...), got "
                                     f"{filename} ({type(exc).__name__})") from None
        if w * h > MAX_PIXELS:
            raise HTTPException(413, f"file: expected an image of at most {MAX_PIXELS} pixels, got {w}x{h}")
        try:
            return decode_image(data, where=filename)
        except ImageDecodeError as exc:
            raise HTTPException(400, f"file: {exc}") from None

    def query_text(q: str) -> str:
        text = q.strip()
        if not text:
            raise HTTPException(422, "q: expected a non-empty query, got ''")
        if len(text) > 1000:
            raise HTTPException(422, f"q: expected at most 1000 characters, got {len(text)}")
        return text

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/api/info", response_model=InfoResponse)
    def info() -> InfoResponse:
        """The index: how many images, which model, which FAISS index, the request limits."""
        model = Path(index.model).name or index.model  # its name: the server's paths stay on the server
        return InfoResponse(size=index.size, dim=index.dim, model=model, index=index.kind, max_k=max_k,
                            max_upload_bytes=max_upload_bytes, locate=can_locate)

    @app.get("/api/search", response_model=SearchResponse)
    def search_text(q: str = Query(..., description="the text to search for"),
                    k: int = Query(10, description=f"how many results, 1..{max_k}")) -> SearchResponse:
        """The ``k`` images nearest to a text."""
        k = k_of(k)
        text = query_text(q)
        vec = encoder.embed_texts([text])
        return SearchResponse(query=text, k=k, results=_results(index.search(vec, k, max_k)[0]))

    @app.post("/api/search/image", response_model=SearchResponse)
    async def search_image(file: UploadFile = File(..., description="an image file"),
                           k: int = Query(10, description=f"how many results, 1..{max_k}")) -> SearchResponse:
        """The ``k`` images nearest to an uploaded image."""
        k = k_of(k)
        image = await read_upload(file)
        def run() -> SearchResponse:
            vec = encoder.embed_images(encoder.preprocess(image)[None])
            return SearchResponse(query=file.filename or "upload", k=k, results=_results(index.search(vec, k, max_k)[0]))

        return await run_in_threadpool(run)

    @app.get("/api/images/{image_id}", responses={200: {"content": {"image/*": {}}}, 404: {}})
    def image(image_id: int = PathParam(..., ge=0, le=MAX_ID)) -> Response:
        """An indexed image, by its id (the only way to read a file through this server)."""
        try:
            data, media = index.image_bytes(image_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except OSError as exc:
            raise gone(image_id, exc) from None
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600",
                                                         "X-Content-Type-Options": "nosniff"})

    @app.post("/api/images/{image_id}/caption", response_model=CaptionResponse)
    def caption_indexed(image_id: int = PathParam(..., ge=0, le=MAX_ID)) -> CaptionResponse:
        """A caption of an indexed image, generated by the model (KV-cached greedy decoding)."""
        with cache_lock:
            if image_id in captions:
                captions.move_to_end(image_id)
                return CaptionResponse(id=image_id, caption=captions[image_id])
        try:
            rec = index.record(image_id)
            if rec is not None and is_video(rec.member or rec.path) and getattr(encoder, "media", "image") == "video":
                data, _ = index.item_bytes(image_id)
                pixels = encoder.read_video(data, f"video {image_id}")[0]  # type: ignore[attr-defined]
            else:
                data, _ = index.image_bytes(image_id)
                pixels = encoder.preprocess(decode_image(data, where=f"image {image_id}"))
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except (OSError, ImageDecodeError) as exc:
            raise gone(image_id, exc) from None
        text = encoder.caption(pixels[None])[0]
        with cache_lock:
            captions[image_id] = text
            while len(captions) > caption_cache:
                captions.popitem(last=False)
        return CaptionResponse(id=image_id, caption=text)

    @app.get("/api/images/{image_id}/locate", response_model=LocateResponse)
    def locate(image_id: int = PathParam(..., ge=0, le=MAX_ID),
               q: str = Query(..., description="the text to find in the image"),
               threshold: float = Query(0.1, description="lowest score kept, in [0, 1]"),
               max_boxes: int = Query(5, description=f"most boxes, 1..{MAX_BOXES}")) -> LocateResponse:
        """Where a text is in an indexed image: the model's boxes for it (``mammut detect``'s,
        per-query NMS at IoU 0.3), best first, in the image's pixels. Only a model that finds text
        in images (an open-vocabulary detector, ``/api/info``'s ``locate``) answers; others 400."""
        if not can_locate:  # before anything else: no compute for a model that cannot
            name = Path(index.model).name or index.model or "the served model"
            raise HTTPException(400, f"locate: the model of this index ({name}) cannot locate text in images: it is "
                                     f"not an open-vocabulary detector; index with a run trained with "
                                     f"train.task: detection to see where a query is")
        text = query_text(q)
        if not 0.0 <= threshold <= 1.0:
            raise HTTPException(422, f"threshold: expected a score in [0, 1], got {threshold}")
        if not 1 <= max_boxes <= MAX_BOXES:
            raise HTTPException(422, f"max_boxes: expected an int in [1, {MAX_BOXES}], got {max_boxes}")
        key = (image_id, text, float(threshold), max_boxes)
        with cache_lock:
            if key in located:
                located.move_to_end(key)
                return located[key]
        try:
            rec = index.record(image_id)
            if rec is not None and is_video(rec.member or rec.path):
                raise HTTPException(400, f"id: item {image_id} is a video; boxes are found in images")
            data, _ = index.image_bytes(image_id)
            image = ImageOps.exif_transpose(decode_image(data, where=f"image {image_id}"))  # as browsers show it
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except (OSError, ImageDecodeError) as exc:
            raise gone(image_id, exc) from None
        locate_in = encoder.locate  # type: ignore[attr-defined]  # can_locate: the encoder has it
        found = locate_in(image, [text], threshold=threshold, max_detections=max_boxes)
        out = LocateResponse(id=image_id, query=text, width=image.width, height=image.height,
                             boxes=[LocatedBox(score=d["score"], box=d["box"]) for d in found])
        with cache_lock:
            located[key] = out
            while len(located) > caption_cache:
                located.popitem(last=False)
        return out

    @app.post("/api/caption", response_model=CaptionResponse)
    async def caption_upload(file: UploadFile = File(..., description="an image file")) -> CaptionResponse:
        """A caption of an uploaded image, generated by the model."""
        image = await read_upload(file)
        text = await run_in_threadpool(lambda: encoder.caption(encoder.preprocess(image)[None])[0])
        return CaptionResponse(id=None, caption=text)

    return app
