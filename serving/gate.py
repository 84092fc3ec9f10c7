"""ASGI middleware in front of the model endpoints: the API key, the body size limit, raw-body uploads.

BentoML 1.4 has no request-size limit, and its endpoints read parameters from a JSON or multipart body
only. For the routes it guards, `Gate`:

- answers 401 when an API key is configured and `Authorization: Bearer KEY` does not match;
- answers 413 when Content-Length exceeds the limit, before reading any of the body, and stops reading a
  body without Content-Length (chunked) as soon as it passes the limit; the application receives the
  body in one piece, never more than the limit;
- on the upload routes, turns a raw body (any Content-Type but multipart/form-data and
  application/json) into a multipart form: the body is the file field `image`, the query parameters
  become the other fields. So `curl --data-binary @a.png 'HOST/segment?tile=512'` is the same request
  as `curl -F image=@a.png -F tile=512 HOST/segment`;
- on the upload routes, answers 400 for a multipart body that does not parse or lacks exactly one file
  field `image` (BentoML answers 500 to a malformed form, and fetches a URL given as text in a file field).

Other paths (health, metrics, docs) pass untouched.
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
        if scope["type"] != "http" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers.get("authorization", "")):
            return await reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               {"www-authenticate": "Bearer"})  # fmt: skip
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await reply(send, 400, f"bad Content-Length {length!r}")
        if length is not None and int(length) > self.max_bytes:
            return await reply(send, 413, f"request body of {int(length)} bytes is over the limit of {self.max_bytes}")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await reply(send, 413, f"request body is over the limit of {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        body = bytes(body)
        if scope["path"] in self.upload_routes and scope["method"] == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            try:
                if content_type == "multipart/form-data":
                    await check_form(headers, body)
                elif content_type != "application/json":
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
