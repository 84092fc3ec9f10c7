"""ASGI middleware in front of the model endpoints: the API key, content types, the body size limit,
raw-body uploads, and error bodies in one shape.

BentoML 1.4 has no request-size limit, chooses its deserialiser (pickle among them) by Content-Type, and
its endpoints read parameters from a JSON or multipart body only. For the routes it guards, `Gate`:

- answers 401 when an API key is configured and `Authorization: Bearer KEY` does not match;
- answers 415 to a Content-Type the route does not document (`UPLOAD_TYPES` on the upload routes,
  `JSON_TYPES` on the others), before BentoML sees the request;
- answers 413 when Content-Length exceeds the limit, before reading any of the body, and stops reading a
  body without Content-Length (chunked) as soon as it passes the limit; the application receives the
  body in one piece, never more than the limit;
- answers 408 and closes the connection when a body stalls for `body_timeout` seconds between two reads,
  or averages under `min_body_rate` bytes/s once it has taken BODY_GRACE seconds (a trickling client);
- takes one of `concurrency` slots for the model only once the body is in (429 when none is free), so
  clients still sending hold none; starts the request's deadline (`timeout`, 504 past it) then too;
- watches for the client going away once the body is in, and sets the request's GONE event, which the
  predictor's check reads between tile batches: a request nobody waits for stops within a batch;
- caps form fields and query parameters (count and length) and renames an uploaded file whose name
  BentoML could not store, and passes the Content-Type on in lower case (media types ignore case);
- on the upload routes, turns a raw body (any accepted Content-Type but multipart/form-data) into a
  multipart form: the body is the file field `image`, the query parameters become the other fields. So
  `curl --data-binary @a.png 'HOST/segment?tile=512'` is the same request as
  `curl -F image=@a.png -F tile=512 HOST/segment`;
- on the upload routes, answers 400 for a multipart body that does not parse or lacks exactly one file
  field `image` (BentoML answers 500 to a malformed form, and fetches a URL given as text in a file field);
- rewrites every error answer, on any path (BentoML's pydantic `detail` lists, its plain-text 404 and 405),
  as {"error": "..."}, and documents these errors in the OpenAPI schema it serves at `DOCS` (without
  naming the server's software version); `/` sends browsers to the page at /ui/ (BentoML's page there
  loads a third-party script).

On the job routes (`JOBS` and below) it checks the API key, and for an upload its Content-Type and its
Content-Length against SEG_JOB_MAX_BYTES; the route streams the body to disk itself (`body_chunks`, with the
same read timeouts). Other paths (health, metrics, /ui) pass otherwise untouched.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import re
import itertools
import secrets
import tempfile
import threading
import time
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serving.lifecycle import DEADLINE, GONE
from serving.settings import BODY_GRACE

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DOCS = "/docs.json"
JOBS = "/jobs"  # POST /jobs, GET /jobs, GET and DELETE /jobs/ID, GET /jobs/ID/result: serving.job_routes
API_VERSION = "1"  # of the endpoints as documented at DOCS (info.version), not of any software
IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/octet-stream")
# "" is a request without Content-Type; x-www-form-urlencoded is what `curl --data-binary` sends by default.
UPLOAD_TYPES = frozenset({"", "multipart/form-data", *IMAGE_TYPES, "application/x-www-form-urlencoded"})
JSON_TYPES = frozenset({"", "application/json"})
SPOOL_BYTES = 1 << 20  # a body past this goes to a temporary file
CHUNK_BYTES = 1 << 20  # bodies go on to BentoML in chunks of this size
HEAD_BYTES = 64 << 10  # the start of a multipart body that holds the image part's headers
MAX_FIELDS = 32  # form fields or query parameters of one request
MAX_FIELD_CHARS = 256  # characters of one field's value (a tile size, a TTA level: a few)
MAX_JSON_DEPTH = 32
SAFE_FILENAME = re.compile(r"[A-Za-z0-9._ -]{1,64}")
ERRORS = {
    400: "unreadable or unsupported image, parameters out of range, malformed body",
    401: "API key missing or wrong (when the server has one)",
    408: "the request body stalled or arrived too slowly",
    413: "body or image over the server's limits",
    415: "a Content-Type the route does not take",
    429: "too many requests at once",
    503: "the server is shutting down; send the request again",
    504: "not answered in time",
}


class Gate:
    """Guard `routes` (exact paths); `upload_routes` take an image; see the module docstring."""

    def __init__(
        self, app, routes: Iterable[str], upload_routes: Iterable[str], max_bytes: int, api_key: str | None = None,
        concurrency: int | None = None, timeout: float | None = None, body_timeout: float = 60.0,
        min_body_rate: float = 1.0, job_max_bytes: int = 0, paths: dict[str, Any] | None = None,
    ):  # fmt: skip
        """`paths`: OpenAPI paths of routes BentoML does not know (the jobs), added to the schema at `DOCS`."""
        self.app = app
        self.paths = paths or {}
        self.routes = frozenset(routes)
        self.upload_routes = frozenset(upload_routes)
        self.max_bytes = max_bytes
        self.api_key = api_key
        self.slots = asyncio.Semaphore(concurrency) if concurrency else None
        self.timeout, self.body_timeout, self.min_body_rate = timeout, body_timeout, min_body_rate
        self.job_max_bytes = job_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            return await redirect(send, "/ui/")
        if scope["path"] == DOCS and scope["method"] == "GET":
            return await self.app(scope, receive, documented(send, self.routes, self.upload_routes, self.paths))
        send = plain_errors(send)
        job = scope["path"] == JOBS or scope["path"].startswith(JOBS + "/")
        if scope["path"] not in self.routes and not job:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers.get("authorization", "")):
            return await reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               {"www-authenticate": "Bearer"})  # fmt: skip
        types = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"]
        if len(types) > 1:
            return await reply(send, 400, "send one Content-Type header")
        content_type = types[0].split(";")[0].strip().lower() if types else ""
        if job:  # the job routes read their own bodies (streamed to disk, up to SEG_JOB_MAX_BYTES)
            return await self._job_request(scope, receive, send, headers, content_type)
        upload = scope["path"] in self.upload_routes
        refused = head_error(headers, content_type, upload, self.max_bytes, "SEG_MAX_BYTES")
        if refused:
            return await reply(send, *refused)
        try:
            body = await self._read_body(receive)
        except BodyError as err:
            return await reply(send, err.status, str(err))
        if body is None:
            return  # the client went away while sending
        with body:
            try:
                if upload and scope["method"] == "POST":
                    if content_type == "multipart/form-data":
                        scope, chunks = await checked_form(scope, headers, body)
                    else:
                        scope, chunks = as_multipart(scope, body, content_type or "application/octet-stream")
                else:
                    data = body.file.read()
                    check_json(data)
                    chunks = iter([data])
            except ValueError as err:
                return await reply(send, 400, str(err))
            if self.slots is not None and self.slots.locked():
                return await reply(send, 429, "too many requests at once; send it again later")
            async with self.slots or _NO_SLOT:
                await self._run(scope, chunks, receive, send)

    async def _job_request(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], content_type: str) -> None:
        """A request to the job routes: an upload's Content-Type and Content-Length are checked here, its body is
        read by the route."""
        if scope["method"] == "POST" and scope["path"] == JOBS:
            refused = head_error(headers, content_type, True, self.job_max_bytes, "SEG_JOB_MAX_BYTES")
            if refused:
                return await reply(send, *refused)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive) -> Body | None:
        """The whole body, spooled to a temporary file past SPOOL_BYTES (None when the client disconnects
        first); BodyError past the limits."""
        body = Body()
        try:
            async for chunk in body_chunks(receive, self.max_bytes, "SEG_MAX_BYTES", self.body_timeout, self.min_body_rate):
                body.write(chunk)
        except Disconnected:
            body.close()
            return None
        except BaseException:
            body.close()
            raise
        body.file.seek(0)
        return body

    async def _run(self, scope: Scope, chunks: Iterator[bytes], receive: Receive, send: Send) -> None:
        """The application on the whole body, with the request's deadline and its client watched; 504 (when no
        answer has started) past the deadline."""
        gone = threading.Event()
        watcher = asyncio.ensure_future(watch(receive, gone))
        if self.timeout:
            DEADLINE.set(time.monotonic() + self.timeout)
        GONE.set(gone)
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, replay(chunks, watcher), send_started), self.timeout)
        except asyncio.TimeoutError:
            if not started:
                await reply(send, 504, f"not answered within {self.timeout:g} seconds (SEG_TIMEOUT)")
        finally:
            watcher.cancel()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


class Body:
    """A request body as it arrives: in memory up to SPOOL_BYTES, then in a temporary file (so one upload
    costs the server about a chunk of memory, not its size)."""

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="seg-body-")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.file.read(CHUNK_BYTES):
            yield chunk

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Body":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def head_error(
    headers: dict[str, str], content_type: str, upload: bool, max_bytes: int, limit_name: str
) -> tuple[int, str] | None:
    """(status, message) for a request whose head already refuses it: a Content-Type the route does not take
    (415), a bad Content-Length (400) or one past `max_bytes` (413); None otherwise."""
    if content_type not in (UPLOAD_TYPES if upload else JSON_TYPES):
        takes = "multipart/form-data or the image itself as " + ", ".join(IMAGE_TYPES)
        wanted = takes if upload else "application/json or no body"
        return 415, f"Content-Type {content_type[:100]!r} is not accepted here; send {wanted}"
    length = headers.get("content-length")
    if length is not None and not length.isdigit():
        return 400, f"bad Content-Length {length!r}"
    if length is not None and int(length) > max_bytes:
        return 413, f"request body of {int(length)} bytes is over the limit of {max_bytes} ({limit_name})"
    return None


class BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Disconnected(Exception):
    """The client went away before its body was in."""


async def body_chunks(
    receive: Receive, max_bytes: int, limit_name: str, body_timeout: float, min_body_rate: float
) -> AsyncIterator[bytes]:
    """A request body's chunks as they arrive; BodyError (413) past `max_bytes` (the setting `limit_name`),
    (408) when it stalls for `body_timeout` seconds or averages under `min_body_rate` bytes/s after
    BODY_GRACE seconds; Disconnected when the client leaves."""
    start, size = time.monotonic(), 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), body_timeout)
        except asyncio.TimeoutError:
            raise BodyError(408, f"no part of the request body came for {body_timeout:g} s (SEG_BODY_TIMEOUT)") from None
        if message["type"] == "http.disconnect":
            raise Disconnected()
        data = message.get("body", b"")
        size += len(data)
        if size > max_bytes:
            raise BodyError(413, f"request body is over the limit of {max_bytes} bytes ({limit_name})")
        yield data
        if not message.get("more_body", False):
            return
        took = time.monotonic() - start
        if took > BODY_GRACE and size < min_body_rate * took:
            raise BodyError(408, f"the request body is arriving at under {min_body_rate:g} bytes/s (SEG_MIN_BODY_RATE)")


class _NoSlot:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc) -> None:
        return None


_NO_SLOT = _NoSlot()


async def watch(receive: Receive, gone: threading.Event) -> Message:
    """Wait for the client's disconnect (all that `receive` gives once the body is in) and set `gone`."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return message


def check_json(body: bytes) -> None:
    """ValueError for a JSON body nested deeper than MAX_JSON_DEPTH (Python's parser would recurse out)."""
    depth = 0
    for char in re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', body):
        if char in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON body nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in b"]}":
            depth -= 1


def check_field(name: str, value: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"field {name[:40]!r} is {len(value)} characters long; at most {MAX_FIELD_CHARS}")


async def checked_form(scope: Scope, headers: dict[str, str], body: Body) -> tuple[Scope, Iterator[bytes]]:
    """The multipart request as BentoML can take it: ValueError unless the body parses, holds exactly one file
    field `image` and at most MAX_FIELDS short fields; the Content-Type's media type in lower case, and the
    file renamed "image" when its name is one BentoML could not use as a temporary file's."""

    async def stream():
        for chunk in body.chunks():
            yield chunk

    try:
        form = await MultiPartParser(Headers(headers), stream(), max_files=1, max_fields=MAX_FIELDS).parse()
    except MultiPartException as err:
        raise ValueError(f"malformed multipart body: {err.message}") from None
    except Exception as err:  # python-multipart on bytes it cannot make sense of
        raise ValueError(f"malformed multipart body ({type(err).__name__})") from None
    try:
        images = form.getlist("image")
        if len(images) != 1 or not isinstance(images[0], UploadFile):
            raise ValueError("send the image as one file field named 'image' (e.g. curl -F image=@a.png)")
        for name, value in form.multi_items():
            if isinstance(value, str):
                check_field(name, value)
        filename = images[0].filename or ""
    finally:
        await form.close()
    media, _, params = headers.get("content-type", "").partition(";")
    fixed = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    fixed.append((b"content-type", f"{media.strip().lower()};{params}".encode("latin-1")))
    body.file.seek(0)
    head = body.file.read(HEAD_BYTES)
    if filename and not SAFE_FILENAME.fullmatch(filename):
        head = renamed(head)
    fixed.append((b"content-length", str(body.size - HEAD_BYTES + len(head) if body.size > HEAD_BYTES else len(head)).encode()))
    return {**scope, "headers": fixed}, itertools.chain([head], body.chunks())


def renamed(head: bytes) -> bytes:
    """The start of a multipart body with the `image` part's Content-Disposition line replaced by one naming
    the file "image" (the parts before it are short fields, so its headers lie within HEAD_BYTES)."""
    at = re.search(rb'(?im)^content-disposition:[^\r\n]*[;\s]name="?image"?(;|\r|$)[^\r\n]*', head)
    if at is None:
        return head
    return head[: at.start()] + b'Content-Disposition: form-data; name="image"; filename="image"' + head[at.end() :]


def redirect(send: Send, location: str) -> Awaitable[None]:
    return reply(send, 307, f"see {location}", {"location": location})


def as_multipart(scope: Scope, body: Body, content_type: str) -> tuple[Scope, Iterator[bytes]]:
    """A raw-body request as a multipart form: the body as file `image`, query parameters as fields."""
    boundary = secrets.token_hex(16)
    fields = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"{len(fields)} query parameters; at most {MAX_FIELDS}")
    parts = []
    for name, value in fields:
        if name == "image" or not name.isidentifier():
            raise ValueError(f"query parameter {name[:40]!r} is not allowed; send the image as the body")
        check_field(name, value)
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    safe_type = content_type if all(c.isalnum() or c in "/.+-" for c in content_type) else "application/octet-stream"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
        f"Content-Type: {safe_type}\r\n\r\n".encode()
    )
    head, tail = b"".join(parts), f"\r\n--{boundary}--\r\n".encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    headers += [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        (b"content-length", str(len(head) + body.size + len(tail)).encode()),
    ]
    return {**scope, "headers": headers}, itertools.chain([head], body.chunks(), [tail])


def replay(chunks: Iterator[bytes], watcher: asyncio.Future) -> Receive:
    """A `receive` that gives the body chunk by chunk, then the client's disconnect once `watcher` sees it."""
    chunks = iter(chunks)
    pending = next(chunks, b"")

    async def receive_body() -> Message:
        nonlocal pending
        if pending is None:
            return await asyncio.shield(watcher)
        data, pending = pending, next(chunks, None)
        return {"type": "http.request", "body": data, "more_body": pending is not None}

    return receive_body


async def reply(send: Send, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error {"error": ...}; `Connection: close`, as the unread rest of a body may follow."""
    content = json.dumps({"error": error}).encode()
    fields = {"content-type": "application/json", "content-length": str(len(content)), "connection": "close"}
    raw = [(k.encode(), v.encode()) for k, v in {**fields, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def plain_errors(send: Send) -> Send:
    """A `send` that rewrites the application's error answers (4xx, 5xx; JSON or text) as {"error": "..."}."""
    start: Message | None = None
    body = b""

    async def send_plain(message: Message) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        body += message.get("body", b"")
        if message.get("more_body", False):
            return
        content = json.dumps({"error": error_text(body, start["status"])}).encode()
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        fields = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({**start, "headers": kept + fields})
        await send({"type": "http.response.body", "body": content})

    return send_plain


def error_text(body: bytes, status: int = 400) -> str:
    """One line from an error body: ours, BentoML's [{"error": ...}], pydantic's validation `detail`, or
    the status's own phrase for a text body (Starlette's "Not Found")."""
    phrase = HTTPStatus(status).phrase.lower() if status in HTTPStatus._value2member_map_ else "bad request"
    try:
        data = json.loads(body)
    except ValueError:
        return phrase
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return phrase
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        return "; ".join(
            f"{'.'.join(str(part) for part in d.get('loc', [])) or 'body'}: {d.get('msg', 'invalid')}" for d in detail
        )
    return str(data.get("error") or phrase)


def documented(send: Send, routes: frozenset[str], upload_routes: frozenset[str], paths: dict[str, Any]) -> Send:
    """A `send` that adds the raw-body uploads, the {"error": ...} answers and `paths` to BentoML's OpenAPI
    schema."""
    start: Message | None = None
    body = b""

    async def send_doc(message: Message) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                return await send(message)
            start = message
            return
        if start is None:
            return await send(message)
        body += message.get("body", b"")
        if message.get("more_body", False):
            return
        content = json.dumps(openapi(json.loads(body), routes, upload_routes, paths)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return send_doc


def openapi(spec: dict, routes: frozenset[str], upload_routes: frozenset[str], paths: dict[str, Any] | None = None) -> dict:
    """BentoML's schema with our request bodies and error answers (BentoML's 404/500 never happen there),
    `paths` added, and our own title block: BentoML's names its version and links to its community pages."""
    spec["info"] = {"title": "seg", "version": API_VERSION,
                    "description": "Segmentation of images of any size; the page at /ui/ uses these endpoints."}
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
        "type": "object",
        "title": "Error",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what was wrong, in one line"}},
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path in routes:
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        ok = operation.get("responses", {}).get("200")
        operation["responses"] = {"200": ok, **{str(s): {"description": d, "content": error} for s, d in ERRORS.items()}}
        if path in upload_routes:
            raw = {"schema": {"type": "string", "format": "binary", "minLength": 1}}
            request = operation.setdefault("requestBody", {})
            request["required"] = True
            request.setdefault("content", {}).update({t: raw for t in IMAGE_TYPES})
            for form in request["content"].values():
                fields = form["schema"].get("properties", {})
                if "image" in fields:
                    fields["image"]["minLength"] = 1
                for field in fields.values():  # BentoML drops the null of `int | None = None`
                    if "default" in field and field["default"] is None:
                        field["nullable"] = True
            operation["description"] = (
                operation.get("description", "") + "\n\nThe image may also be the raw body, with the other "
                "parameters in the query string (`?tile=512&tta=d4`)."
            ).strip()
    spec.setdefault("paths", {}).update(copy.deepcopy(paths or {}))
    return spec
