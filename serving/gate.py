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
- on the upload routes, turns a raw body (any accepted Content-Type but multipart/form-data) into a
  multipart form: the body is the file field `image`, the query parameters become the other fields. So
  `curl --data-binary @a.png 'HOST/segment?tile=512'` is the same request as
  `curl -F image=@a.png -F tile=512 HOST/segment`;
- on the upload routes, answers 400 for a multipart body that does not parse or lacks exactly one file
  field `image` (BentoML answers 500 to a malformed form, and fetches a URL given as text in a file field);
- rewrites BentoML's own error answers (a `detail` list of pydantic errors, or a JSON list) as
  {"error": "..."}, and documents these errors in the OpenAPI schema it serves at `DOCS`.

Other paths (health, metrics) pass untouched.
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DOCS = "/docs.json"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/octet-stream")
# "" is a request without Content-Type; x-www-form-urlencoded is what `curl --data-binary` sends by default.
UPLOAD_TYPES = frozenset({"", "multipart/form-data", *IMAGE_TYPES, "application/x-www-form-urlencoded"})
JSON_TYPES = frozenset({"", "application/json"})
ERRORS = {
    400: "unreadable or unsupported image, parameters out of range, malformed body",
    401: "API key missing or wrong (when the server has one)",
    413: "body or image over the server's limits",
    415: "a Content-Type the route does not take",
    429: "too many requests at once",
    503: "the server is shutting down; send the request again",
    504: "not answered in time",
}


class Gate:
    """Guard `routes` (exact paths); `upload_routes` take an image; see the module docstring."""

    def __init__(
        self, app, routes: Iterable[str], upload_routes: Iterable[str], max_bytes: int, api_key: str | None = None
    ):
        self.app = app
        self.routes = frozenset(routes)
        self.upload_routes = frozenset(upload_routes)
        self.max_bytes = max_bytes
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == DOCS and scope["method"] == "GET":
            return await self.app(scope, receive, documented(send, self.routes, self.upload_routes))
        if scope["type"] != "http" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        send = plain_errors(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers.get("authorization", "")):
            return await reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               {"www-authenticate": "Bearer"})  # fmt: skip
        types = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"]
        if len(types) > 1:
            return await reply(send, 400, "send one Content-Type header")
        content_type = types[0].split(";")[0].strip().lower() if types else ""
        accepted = UPLOAD_TYPES if scope["path"] in self.upload_routes else JSON_TYPES
        if content_type not in accepted:
            takes = "multipart/form-data or the image itself as " + ", ".join(IMAGE_TYPES)
            wanted = takes if scope["path"] in self.upload_routes else "application/json or no body"
            return await reply(send, 415, f"Content-Type {content_type[:100]!r} is not accepted here; send {wanted}")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await reply(send, 400, f"bad Content-Length {length!r}")
        if length is not None and int(length) > self.max_bytes:
            return await reply(send, 413, f"request body of {int(length)} bytes is over the limit of "
                                          f"{self.max_bytes} (SEG_MAX_BYTES)")  # fmt: skip
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await reply(send, 413, f"request body is over the limit of {self.max_bytes} bytes (SEG_MAX_BYTES)")
            if not message.get("more_body", False):
                break
        body = bytes(body)
        if scope["path"] in self.upload_routes and scope["method"] == "POST":
            try:
                if content_type == "multipart/form-data":
                    await check_form(headers, body)
                else:
                    scope, body = as_multipart(scope, body, content_type or "application/octet-stream")
            except ValueError as err:
                return await reply(send, 400, str(err))
        await self.app(scope, replay(body, receive), send)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def check_form(headers: dict[str, str], body: bytes) -> None:
    """ValueError unless the multipart body parses and holds exactly one file field `image`."""

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers(headers), stream(), max_files=1, max_fields=32).parse()
    except MultiPartException as err:
        raise ValueError(f"malformed multipart body: {err.message}") from None
    except Exception as err:  # python-multipart on bytes it cannot make sense of
        raise ValueError(f"malformed multipart body ({type(err).__name__})") from None
    images = form.getlist("image")
    await form.close()
    if len(images) != 1 or not isinstance(images[0], UploadFile):
        raise ValueError("send the image as one file field named 'image' (e.g. curl -F image=@a.png)")


def as_multipart(scope: Scope, body: bytes, content_type: str) -> tuple[Scope, bytes]:
    """A raw-body request as a multipart form: the body as file `image`, query parameters as fields."""
    boundary = secrets.token_hex(16)
    fields = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    parts = []
    for name, value in fields:
        if name == "image" or not name.isidentifier():
            raise ValueError(f"query parameter {name!r} is not allowed; send the image as the body")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    safe_type = content_type if all(c.isalnum() or c in "/.+-" for c in content_type) else "application/octet-stream"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
        f"Content-Type: {safe_type}\r\n\r\n".encode()
    )
    form = b"".join(parts) + body + f"\r\n--{boundary}--\r\n".encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    headers += [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        (b"content-length", str(len(form)).encode()),
    ]
    return {**scope, "headers": headers}, form


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the whole body once, then waits on the real one (for a disconnect)."""
    sent = False

    async def receive_body() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_body


async def reply(send: Send, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error {"error": ...}; `Connection: close`, as the unread rest of a body may follow."""
    content = json.dumps({"error": error}).encode()
    fields = {"content-type": "application/json", "content-length": str(len(content)), "connection": "close"}
    raw = [(k.encode(), v.encode()) for k, v in {**fields, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def plain_errors(send: Send) -> Send:
    """A `send` that rewrites the application's JSON error answers (4xx, 5xx) as {"error": "..."}."""
    start: Message | None = None
    body = b""

    async def send_plain(message: Message) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start" and message["status"] >= 400:
            kinds = [v for k, v in message.get("headers", []) if k.lower() == b"content-type"]
            if kinds and kinds[0].startswith(b"application/json"):
                start = message
                return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        body += message.get("body", b"")
        if message.get("more_body", False):
            return
        content = json.dumps({"error": error_text(body)}).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return send_plain


def error_text(body: bytes) -> str:
    """One line from an error body: ours, BentoML's [{"error": ...}], or pydantic's validation `detail`."""
    try:
        data = json.loads(body)
    except ValueError:
        return "bad request"
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return "bad request"
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        return "; ".join(
            f"{'.'.join(str(part) for part in d.get('loc', [])) or 'body'}: {d.get('msg', 'invalid')}" for d in detail
        )
    return str(data.get("error") or "bad request")


def documented(send: Send, routes: frozenset[str], upload_routes: frozenset[str]) -> Send:
    """A `send` that adds the raw-body uploads and the {"error": ...} answers to BentoML's OpenAPI schema."""
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
        content = json.dumps(openapi(json.loads(body), routes, upload_routes)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return send_doc


def openapi(spec: dict, routes: frozenset[str], upload_routes: frozenset[str]) -> dict:
    """BentoML's schema with our request bodies and error answers (BentoML's 404/500 never happen there)."""
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
    return spec
