"""The gate in front of the service, as an ASGI app driven directly: scope, receive and send by hand.

Behind it is a small application that records what reached it; tests/test_service.py runs the same rules
against a real server.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from serving.gate import DOCS, ERRORS, IMAGE_TYPES, Gate

PNG = (Path(__file__).resolve().parents[1] / "data" / "samples" / "isbi_test_00.png").read_bytes()
LIMIT = 1000


class App:
    """The application behind the gate: records each request (scope, whole body) and answers with `reply`."""

    def __init__(self, status: int = 200, body: bytes = b'{"ok": true}', content_type: bytes = b"application/json"):
        self.status, self.body, self.content_type = status, body, content_type
        self.calls: list[tuple[dict, bytes, int]] = []

    async def __call__(self, scope, receive, send):
        body, messages = b"", 0
        if scope["type"] == "http" and scope["method"] == "POST":
            while True:
                message = await receive()
                messages += 1
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        self.calls.append((scope, body, messages))
        headers = [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reads: int  # receive() calls the gate and the app made

    def json(self):
        return json.loads(self.body)


def call(gate, path="/segment", body=b"", headers=(), method="POST", query=b"", chunks=None) -> Answer:
    """One request through `gate`: the body in one message, or as `chunks` (an iterable) with more_body."""
    messages = iter(chunks) if chunks is not None else iter([body])
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        if reads > 100:
            raise AssertionError("read on past the body limit")
        try:
            chunk = next(messages)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": chunks is not None}

    sent = []

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": raw}
    asyncio.run(gate(scope, receive, send))
    start = sent[0]
    assert start["type"] == "http.response.start"
    answer_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    content = b"".join(m.get("body", b"") for m in sent[1:])
    if "content-length" in answer_headers:
        assert int(answer_headers["content-length"]) == len(content)
    return Answer(start["status"], answer_headers, content, reads)


def make_gate(app=None, api_key=None) -> tuple[Gate, App]:
    app = app or App()
    return Gate(app, routes=["/segment", "/info"], upload_routes=["/segment"], max_bytes=LIMIT, api_key=api_key), app


def form_of(scope: dict, body: bytes):
    async def parse():
        async def stream():
            yield body

        return await MultiPartParser(Headers(raw=scope["headers"]), stream()).parse()

    return asyncio.run(parse())


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> tuple[tuple, bytes]:
    """Headers and body of a form: parts are (name, filename or None, content)."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return (("content-type", f"multipart/form-data; boundary={boundary}"), ("content-length", str(len(out)))), out


def test_other_paths_pass_untouched_even_with_a_key():
    gate, app = make_gate(api_key="s3cret")
    answer = call(gate, path="/healthz", method="GET")
    assert answer.status == 200 and answer.json() == {"ok": True}
    assert app.calls[0][0]["path"] == "/healthz"


def test_a_missing_or_wrong_key_is_401_before_the_body_is_read():
    gate, app = make_gate(api_key="s3cret")
    for auth in ((), (("authorization", "Bearer wrong"),), (("authorization", "Basic s3cret"),)):
        answer = call(gate, path="/info", headers=auth)
        assert answer.status == 401 and answer.reads == 0
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}
    assert not app.calls
    assert call(gate, path="/info", headers=[("authorization", "Bearer s3cret")]).status == 200


@pytest.mark.parametrize(
    "path, content_type, wanted",
    [("/segment", "text/plain", "multipart/form-data or the image itself"),
     ("/info", "image/png", "application/json or no body")],
)  # fmt: skip
def test_an_undocumented_content_type_is_415(path, content_type, wanted):
    gate, app = make_gate()
    answer = call(gate, path=path, body=b"x", headers=[("content-type", content_type)])
    assert answer.status == 415 and not app.calls
    error = answer.json()["error"]
    assert error.startswith(f"Content-Type '{content_type}' is not accepted here; send ") and wanted in error


def test_two_content_types_or_a_bad_length_are_400():
    gate, app = make_gate()
    two = call(gate, body=PNG[:10], headers=[("content-type", "image/png"), ("content-type", "image/tiff")])
    assert two.status == 400 and two.json() == {"error": "send one Content-Type header"}
    bad = call(gate, body=PNG[:10], headers=[("content-type", "image/png"), ("content-length", "1e3")])
    assert bad.status == 400 and bad.json() == {"error": "bad Content-Length '1e3'"}
    assert not app.calls


def test_413_by_content_length_reads_none_of_the_body():
    gate, app = make_gate()
    answer = call(gate, body=PNG, headers=[("content-type", "image/png"), ("content-length", str(len(PNG)))])
    assert answer.status == 413 and answer.reads == 0 and not app.calls
    assert answer.json() == {"error": f"request body of {len(PNG)} bytes is over the limit of {LIMIT} (SEG_MAX_BYTES)"}
    assert answer.headers["connection"] == "close"


def test_413_for_a_chunked_body_stops_reading_at_the_limit():
    gate, app = make_gate()
    endless = iter(lambda: b"x" * 100, None)  # a client that never stops sending
    answer = call(gate, headers=[("content-type", "application/octet-stream")], chunks=endless)
    assert answer.status == 413 and not app.calls
    assert answer.reads == LIMIT // 100 + 1  # the chunk that passed the limit was the last one read
    assert answer.json() == {"error": f"request body is over the limit of {LIMIT} bytes (SEG_MAX_BYTES)"}


def test_a_chunked_body_within_the_limit_reaches_the_app_in_one_piece():
    gate, app = make_gate()
    chunks = [PNG[i : i + 100] for i in range(0, 500, 100)]
    _, form = multipart(("image", "a.png", b"".join(chunks)))
    pieces = [form[i : i + 100] for i in range(0, len(form), 100)]
    answer = call(gate, headers=[("content-type", "multipart/form-data; boundary=b0undary")], chunks=pieces)
    assert answer.status == 200
    (scope, body, messages), = app.calls
    assert body == form and messages == 1


def test_a_raw_body_becomes_a_form_with_the_query_as_fields():
    gate, app = make_gate(App(body=b'{"ok": true}'))
    headers = [("content-type", "image/png"), ("content-length", str(LIMIT)), ("x-request-id", "7")]
    image = PNG[:LIMIT]
    answer = call(gate, body=image, headers=headers, query=b"tile=512&tta=true&note=")
    assert answer.status == 200
    (scope, body, _), = app.calls
    sent = Headers(raw=scope["headers"])
    assert sent["content-type"].startswith("multipart/form-data; boundary=")
    assert int(sent["content-length"]) == len(body) and sent["x-request-id"] == "7"
    form = form_of(scope, body)
    upload = form["image"]
    assert isinstance(upload, UploadFile) and upload.content_type == "image/png"
    assert asyncio.run(upload.read()) == image
    assert (form["tile"], form["tta"], form["note"]) == ("512", "true", "")


def test_a_raw_body_of_unknown_type_is_sent_on_as_octet_stream():
    gate, app = make_gate()
    assert call(gate, body=PNG[:100]).status == 200  # no Content-Type at all
    (scope, body, _), = app.calls
    assert form_of(scope, body)["image"].content_type == "application/octet-stream"


@pytest.mark.parametrize("query, name", [(b"image=http://example.com/a.png", "image"), (b"a-b=1", "a-b")])
def test_a_query_parameter_that_is_no_field_is_400(query, name):
    gate, app = make_gate()
    answer = call(gate, body=PNG[:100], headers=[("content-type", "image/png")], query=query)
    assert answer.status == 400 and not app.calls
    assert answer.json() == {"error": f"query parameter {name!r} is not allowed; send the image as the body"}


def test_a_good_form_passes_as_it_came():
    gate, app = make_gate()
    headers, body = multipart(("image", "a.png", PNG[:300]), ("tile", None, b"256"))
    assert call(gate, body=body, headers=headers).status == 200
    (scope, received, _), = app.calls
    assert received == body and Headers(raw=scope["headers"])["content-type"] == headers[0][1]


@pytest.mark.parametrize(
    "parts, error",
    [((("tile", None, b"256"),), "send the image as one file field named 'image' (e.g. curl -F image=@a.png)"),
     ((("image", None, b"http://example.com/a.png"),), "send the image as one file field named 'image'"),
     ((("image", "a.png", b"1"), ("image", "b.png", b"2")), "malformed multipart body")],
)  # fmt: skip
def test_a_form_without_exactly_one_image_file_is_400(parts, error):
    gate, app = make_gate()
    headers, body = multipart(*parts)
    answer = call(gate, body=body, headers=headers)
    assert answer.status == 400 and not app.calls
    assert answer.json()["error"].startswith(error)


@pytest.mark.parametrize(
    "body, error",
    [(b"garbage", "malformed multipart body: Invalid multipart data."),
     (b"--b0undary\r\nno colon here\r\n\r\nxx\r\n--b0undary--\r\n", "malformed multipart body: Invalid multipart data."),
     (b'--b0undary\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nxx\r\n--b0undary--\r\n',
      'malformed multipart body: The Content-Disposition header field "name" must be provided.'),
     (multipart(("image", "a.png", PNG[:200]))[1][:120], "send the image as one file field named 'image'")],
)  # fmt: skip
def test_a_malformed_form_is_400(body, error):
    gate, app = make_gate()
    answer = call(gate, body=body, headers=[("content-type", "multipart/form-data; boundary=b0undary")])
    assert answer.status == 400 and not app.calls
    assert answer.json()["error"].startswith(error)


def test_the_apps_pydantic_errors_become_one_line():
    detail = {"detail": [{"loc": ["body", "tile"], "msg": "Input should be a valid integer"},
                         {"loc": [], "msg": "Field required"}]}  # fmt: skip
    gate, _ = make_gate(App(422, json.dumps(detail).encode()))
    answer = call(gate, path="/info")
    assert answer.status == 422
    assert answer.json() == {"error": "body.tile: Input should be a valid integer; body: Field required"}


@pytest.mark.parametrize(
    "status, body, error",
    [(500, b'[{"error": "out of memory"}]', "out of memory"), (400, b'{"error": "bad tile"}', "bad tile"),
     (500, b"not json", "internal server error"), (400, b"[1, 2]", "bad request")],
)  # fmt: skip
def test_the_apps_json_errors_become_one_shape(status, body, error):
    gate, _ = make_gate(App(status, body))
    answer = call(gate, path="/info")
    assert answer.status == status and answer.json() == {"error": error}


def test_text_errors_become_json_and_other_answers_pass_untouched():
    gate, _ = make_gate(App(404, b"Not Found", b"text/plain"))
    for path in ("/info", "/no/such/path"):  # guarded or not
        answer = call(gate, path=path)
        assert answer.status == 404 and answer.json() == {"error": "not found"}
        assert answer.headers["content-type"] == "application/json"
    gate, _ = make_gate(App(200, b'{"detail": [1]}'))
    assert call(gate, path="/info").json() == {"detail": [1]}


def test_the_schema_documents_raw_uploads_and_errors():
    form = {"schema": {"properties": {"image": {"type": "string", "format": "binary"}, "tile": {"default": None}}}}
    spec = {"paths": {"/segment": {"post": {"responses": {"200": {"description": "OK"}},
                                            "requestBody": {"content": {"multipart/form-data": form}}}},
                      "/info": {"post": {"responses": {"200": {"description": "OK"}}}}}}  # fmt: skip
    gate, _ = make_gate(App(body=json.dumps(spec).encode()))
    answer = call(gate, path=DOCS, method="GET")
    doc = answer.json()
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    for path in ("/segment", "/info"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", *map(str, ERRORS)}
    upload = doc["paths"]["/segment"]["post"]
    assert set(IMAGE_TYPES) <= set(upload["requestBody"]["content"]) and upload["requestBody"]["required"]
    fields = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert fields["image"]["minLength"] == 1 and fields["tile"]["nullable"] is True
    assert "requestBody" not in doc["paths"]["/info"]["post"]
