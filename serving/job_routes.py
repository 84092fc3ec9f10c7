"""The job routes, as ASGI middleware in front of BentoML (whose routes take no path parameters):

    POST   /jobs              an image (multipart field `image`, or the raw body) -> 202 {"id", "status_url", ...}
    GET    /jobs              the latest jobs, newest first
    GET    /jobs/ID           state, progress (tiles_done, tiles_total), error, result_url
    GET    /jobs/ID/result    the mask file (?part=probabilities: the probabilities), streamed from disk
    DELETE /jobs/ID           cancel a queued or running job, or remove an ended one

The API key and the upload's Content-Type and Content-Length are checked by `serving.gate.Gate` first. An
upload is written to the job's folder as it arrives (multipart parts pass through a temporary file), and its
size is read from its header before the job is queued: 413 past SEG_JOB_MAX_PIXELS, 429 past SEG_JOB_QUEUE.
"""

from __future__ import annotations

import datetime
import re
import shutil
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, Router

from seg.io.headers import TIFF_MAGIC, header_size, image_size, stack_size, unsupported_format
from seg.io.slides import TIFF_SLIDES
from seg.io.writers import FORMATS
from serving.gate import IMAGE_TYPES, MAX_FIELDS, BodyError, Disconnected, body_chunks, check_field
from serving.jobs import MEDIA_TYPES, JobRunner
from serving.settings import Settings

JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobOptions(BaseModel):
    """A job's options, from its form fields or query parameters (text, converted)."""

    model_config = ConfigDict(extra="forbid")
    tile: int | None = Field(None, ge=0)
    overlap: float | None = Field(None, ge=0.0)
    tta: Literal["none", "flips", "d4"] | bool = "none"
    format: Literal[tuple(FORMATS)] = "png"  # type: ignore[valid-type]
    probabilities: bool = False

    @field_validator("tile", "overlap", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # a form's empty field


class JobRoutes:
    """ASGI middleware answering the job routes with `runner`'s store and model; other paths go on to `app`."""

    def __init__(self, app, runner: JobRunner, settings: Settings, tile_range: tuple[int, int], max_overlap: float):
        self.app, self.runner, self.settings = app, runner, settings
        self.tile_range, self.max_overlap = tile_range, max_overlap
        self.router = Router(routes=[
            Route("/jobs", self.submit, methods=["POST"]),
            Route("/jobs", self.listing, methods=["GET"]),
            Route("/jobs/{job_id}", self.status, methods=["GET"]),
            Route("/jobs/{job_id}", self.delete, methods=["DELETE"]),
            Route("/jobs/{job_id}/result", self.result, methods=["GET"]),
        ])  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/jobs" or path.startswith("/jobs/")):
            return await self.app(scope, receive, send)
        try:
            await self.router(scope, receive, send)
        except HTTPException as err:  # the router's 404 and 405 (it raises them inside an application)
            answer = error(err.status_code, HTTPStatus(err.status_code).phrase.lower())
            answer.headers.update(err.headers or {})
            await answer(scope, receive, send)

    @property
    def store(self):
        return self.runner.store

    # -- the routes ----------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        if self.store.waiting() >= self.settings.job_queue:
            return error(429, f"{self.settings.job_queue} jobs are queued or running (SEG_JOB_QUEUE); send it again later",
                         close=True)  # fmt: skip
        job_id, folder = self.store.new_folder()
        upload = folder / "upload"
        try:
            fields, filename = await self._receive(request, upload)
            options = self._options(fields)
            name, height, width = self._check_image(upload, filename)
            slices = stack_size(folder / name)
            if options.format != "tif" and slices > 1:
                raise BodyError(400, f"a stack of {slices} slices is segmented into a multi-page TIFF; send format=tif")
            tiling = self.runner.predictor.options.replace(tile=options.tile, overlap=options.overlap, tta=options.tta)
            tiles = self.runner.predictor.tile_count(height, width, tiling) * slices
            self.store.add(job_id, options.model_dump(), name, height, width, tiles)
        except BodyError as err:
            shutil.rmtree(folder, ignore_errors=True)
            return error(err.status, str(err), close=True)  # the rest of the body may be unread
        except Disconnected:
            shutil.rmtree(folder, ignore_errors=True)
            return Response(status_code=499)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.runner.wake.set()
        return JSONResponse({"id": job_id, "state": "queued", "status_url": f"/jobs/{job_id}"}, status_code=202,
                            headers={"location": f"/jobs/{job_id}"})  # fmt: skip

    async def listing(self, request: Request) -> Response:
        return JSONResponse({"jobs": [self._view(job) for job in self.store.recent()]})

    async def status(self, request: Request) -> Response:
        job = self._job(request)
        return JSONResponse(self._view(job)) if job else not_found(request)

    async def delete(self, request: Request) -> Response:
        job = self._job(request)
        state = self.store.cancel(job["id"]) if job else None
        return JSONResponse({"id": job["id"], "state": state}) if state else not_found(request)

    async def result(self, request: Request) -> Response:
        job = self._job(request)
        if job is None:
            return not_found(request)
        part = request.query_params.get("part", "mask")
        outputs = self.store.outputs(job)
        if part not in outputs:
            return error(400, f"part {part[:40]!r}: this job has {' and '.join(outputs)}")
        if job["state"] != "done":
            progress = f" ({job['tiles_done']} of {job['tiles_total']} tiles)" if job["state"] == "running" else ""
            return error(409, f"job {job['id']} is {job['state']}{progress}; its result comes when it is done")
        path = outputs[part]
        fmt = job["options"]["format"]
        media = MEDIA_TYPES[fmt] if part == "mask" or fmt == "ome-zarr" else "image/tiff"
        return FileResponse(path, media_type=media, filename=f"{job['id']}.{path.name}")

    # -- helpers -------------------------------------------------------------------------------------------
    async def _receive(self, request: Request, upload: Path) -> tuple[dict[str, str], str]:
        """Write the request's image to `upload` as it arrives; the other fields (the query string's, and a
        form's, which win), and the file name a multipart upload gave ("" for a raw body)."""
        s = self.settings
        chunks = body_chunks(request.receive, s.job_max_bytes, "SEG_JOB_MAX_BYTES", s.body_timeout, s.min_body_rate)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            with open(upload, "wb") as f:
                async for chunk in chunks:
                    f.write(chunk)
            fields, filename = parse_qsl(request.url.query, keep_blank_values=True), ""
        else:
            try:
                form = await MultiPartParser(Headers(scope=request.scope), chunks, max_files=1, max_fields=MAX_FIELDS).parse()
            except MultiPartException as err:
                raise BodyError(400, f"malformed multipart body: {err.message}") from None
            except (BodyError, Disconnected):
                raise
            except Exception as err:  # python-multipart on bytes it cannot make sense of
                raise BodyError(400, f"malformed multipart body ({type(err).__name__})") from None
            try:
                images = form.getlist("image")
                if len(images) != 1 or not isinstance(images[0], UploadFile):
                    raise BodyError(400, "send the image as one file field named 'image' (e.g. curl -F image=@a.png)")
                with open(upload, "wb") as f:
                    shutil.copyfileobj(images[0].file, f, 1 << 20)
                query = parse_qsl(request.url.query, keep_blank_values=True)  # options may come either way
                fields = query + [(k, v) for k, v in form.multi_items() if k != "image"]
                filename = images[0].filename or ""
            finally:
                await form.close()
        if len(fields) > MAX_FIELDS:
            raise BodyError(400, f"{len(fields)} parameters; at most {MAX_FIELDS}")
        for name, value in fields:
            if not isinstance(value, str):
                raise BodyError(400, f"field {name[:40]!r} should be text, not a file")
            try:
                check_field(name, value)
            except ValueError as err:
                raise BodyError(400, str(err)) from None
        return dict(fields), filename

    def _options(self, fields: dict[str, str]) -> JobOptions:
        try:
            options = JobOptions(**fields)
        except ValidationError as err:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'a field with no name'}: {e['msg']}" for e in err.errors())
            raise BodyError(400, detail) from None
        low, high = self.tile_range
        if options.tile is not None and not low <= options.tile <= high:
            raise BodyError(400, f"tile: should be from {low} to {high}")
        if options.overlap is not None and options.overlap > self.max_overlap:
            raise BodyError(400, f"overlap: should be at most {self.max_overlap}")
        return options

    def _check_image(self, upload: Path, filename: str) -> tuple[str, int, int]:
        """Name the upload by its format (`input.png`, ...; a TIFF sent as a multipart file named `.svs`,
        `.scn`, ... keeps that suffix, so that OpenSlide reads it as that scanner's slide) and give (its name,
        height, width); BodyError when its header is unreadable or it is over SEG_JOB_MAX_PIXELS."""
        with open(upload, "rb") as f:
            head = f.read(64)
        kind = "tif" if head[:4] in TIFF_MAGIC else header_size(head)[0]
        suffix = Path(filename).suffix.lower()
        name = f"input{suffix}" if kind == "tif" and suffix in TIFF_SLIDES else f"input.{kind}"
        path = upload.rename(upload.with_name(name)) if kind else upload
        size = image_size(path) if kind else None
        if size is None:
            raise BodyError(400, f"image: {unsupported_format(path)}")
        height, width = size
        limit = self.settings.job_max_pixels
        if height * width > limit:
            raise BodyError(413, f"image of {width} x {height} pixels is over the limit of {limit} pixels (SEG_JOB_MAX_PIXELS)")
        return name, height, width

    def _job(self, request: Request) -> dict[str, Any] | None:
        job_id = request.path_params["job_id"]
        return self.store.get(job_id) if JOB_ID.fullmatch(job_id) else None

    def _view(self, job: dict[str, Any]) -> dict[str, Any]:
        view = {
            "id": job["id"], "state": job["state"],
            "progress": {"tiles_done": job["tiles_done"], "tiles_total": job["tiles_total"]},
            "width": job["width"], "height": job["height"], **job["options"],
            "created": iso(job["created"]), "started": iso(job["started"]), "finished": iso(job["finished"]),
        }  # fmt: skip
        if job["state"] == "failed":
            view["error"] = job["error"]
        if job["state"] == "done":
            view["result_url"] = f"/jobs/{job['id']}/result"
            if job["options"].get("probabilities"):
                view["probabilities_url"] = f"/jobs/{job['id']}/result?part=probabilities"
        return view


def openapi_paths(tile_range: tuple[int, int], max_overlap: float) -> dict[str, Any]:
    """The job routes as OpenAPI 3.0 paths, for the schema the gate serves (`serving.gate.openapi`); the
    options come from `JobOptions`, so the two cannot drift apart, with the ranges `JobRoutes` holds them to."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}

    def answers(ok: dict[str, Any], *statuses: int) -> dict[str, Any]:
        failed = {str(s): {"description": HTTPStatus(s).phrase, "content": error} for s in (401, *statuses)}
        return {**ok, **failed}

    def json_answer(status: int, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {str(status): {"description": description, "content": {"application/json": {"schema": schema}}}}

    options = JobOptions.model_json_schema()["properties"]
    for field in options.values():
        field.pop("title", None)
        branches = field.pop("anyOf", [])
        if {"type": "null"} in branches:  # `int | None = None`: left out (or empty) for the model's own value
            field.update(*[b for b in branches if b != {"type": "null"}])
            field.pop("default")
        elif branches:
            field["anyOf"] = branches
    options["tile"].update(minimum=tile_range[0], maximum=tile_range[1])
    options["overlap"]["maximum"] = max_overlap
    chosen = {name: {**field, "nullable": True} if name in ("tile", "overlap") else field for name, field in options.items()}
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": JOB_ID.pattern}}
    text, when = {"type": "string", "nullable": True}, {"type": "string", "format": "date-time", "nullable": True}
    state = {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]}
    count = {"type": "integer", "minimum": 0}
    job = {
        "type": "object", "required": ["id", "state", "progress", "width", "height", "created"],
        "properties": {
            "id": {"type": "string"}, "state": state, "width": count, "height": count,
            "progress": {"type": "object", "required": ["tiles_done", "tiles_total"],
                         "properties": {"tiles_done": count, "tiles_total": count}},
            "created": when, "started": when, "finished": when, "error": text,
            "result_url": {"type": "string"}, "probabilities_url": {"type": "string"}, **chosen,
        },
    }  # fmt: skip
    form = {"type": "object", "required": ["image"], "additionalProperties": False,
            "properties": {"image": {"type": "string", "format": "binary", "minLength": 1}, **options}}  # fmt: skip
    raw = {"schema": {"type": "string", "format": "binary", "minLength": 1}}
    queued = {"type": "object", "required": ["id", "state", "status_url"],
              "properties": {"id": {"type": "string"}, "state": state, "status_url": {"type": "string"}}}  # fmt: skip
    files = {t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(MEDIA_TYPES.values()))}
    return {
        "/jobs": {
            "post": {
                "summary": "Segment an image in the background (past the limits of one request)",
                "description": "The image as the multipart field `image`, or as the raw body with the options "
                               "in the query string; streamed to disk as it arrives.",
                "parameters": [{"name": k, "in": "query", "required": False, "schema": v} for k, v in options.items()],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                              **{t: raw for t in IMAGE_TYPES}}},
                "responses": answers(json_answer(202, "queued", queued), 400, 408, 413, 415, 429),
            },
            "get": {"summary": "The jobs kept, newest first",
                    "responses": answers(json_answer(200, "the jobs", {"type": "object", "required": ["jobs"],
                                         "properties": {"jobs": {"type": "array", "items": job}}}))},
        },
        "/jobs/{job_id}": {
            "parameters": [job_id],
            "get": {"summary": "A job's state and progress", "responses": answers(json_answer(200, "the job", job), 404)},
            "delete": {"summary": "Cancel a queued or running job, or remove an ended one",
                       "responses": answers(json_answer(200, "cancelled or removed", {
                           "type": "object", "required": ["id", "state"],
                           "properties": {"id": {"type": "string"},
                                          "state": {"type": "string", "enum": ["cancelled", "removed"]}}}), 404)},
        },
        "/jobs/{job_id}/result": {
            "parameters": [job_id],
            "get": {"summary": "A done job's mask (or its probabilities), streamed",
                    "parameters": [{"name": "part", "in": "query", "required": False,
                                    "schema": {"type": "string", "enum": ["mask", "probabilities"], "default": "mask"}}],
                    "responses": answers({"200": {"description": "the file", "content": files}}, 400, 404, 409)},
        },
    }  # fmt: skip


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


def not_found(request: Request) -> JSONResponse:
    return error(404, f"no job {request.path_params['job_id'][:40]!r} (finished jobs are kept SEG_JOB_TTL seconds)")
