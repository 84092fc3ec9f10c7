"""The HTTP service: one BentoML service around the shared tiled predictor, `seg.inference.predictor.Predictor`.

    SEG_MODEL=model.onnx bentoml serve serving.service:Segmentation      # or: seg serve model.onnx

Every model endpoint goes request -> image array -> Predictor -> response. The image comes as a multipart
upload (field `image`) or as the raw body (see `serving.gate`); it is checked against the limits from its
header before any pixel is decoded. Client errors answer a JSON body {"error": "..."}; every status and
when it is sent: docs/http-api.md, "Errors".

A prediction checks between tile batches whether its request is past its deadline (SEG_TIMEOUT seconds
after it arrived) or the server is stopping, and if so it stops there: the worker is free for the next
request, and a stopped server exits within seconds.

This module imports bentoml, numpy, PIL and (through seg.inference.predictor) onnxruntime; never torch.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal

import bentoml
import numpy as np
from bentoml.validators import ContentType
from PIL import Image
from pydantic import BaseModel, Field, Strict, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from seg.errors import ImageError, SegError
from seg.inference.modelinfo import ModelInfo
from seg.inference.predictor import Prediction, Predictor
from seg.inference.runtime import gpu_count
from seg.inference.tiling import MAX_TILE, MIN_TILE, TTA_LEVELS
from seg.io import images as imageio
from seg.io.headers import header_shape
from serving.gate import Gate
from serving.job_routes import JobRoutes, openapi_paths
from serving.jobs import JobRunner, JobStore
from serving.lifecycle import TooLarge, client_errors, header_deadline, request_check, stop_on_signals
from serving.responses import display_bands, encode_bands, overlay_bands, png_bytes, run_lengths, timing
from serving.settings import Settings

SETTINGS = Settings.from_env()
if not SETTINGS.model.is_file():  # fail at import: BentoML would restart a failing worker forever
    raise SegError(f"{SETTINGS.model}: no such ONNX model; set SEG_MODEL to a model written by `seg export`")
MAX_OVERLAP = 0.5  # at most 4 tiles cover a pixel: the work per request stays bounded


def job_store(settings: Settings) -> JobStore:
    """The job store in SEG_JOB_DIR; when that is not set and its default is not writable (a read-only home),
    in the temporary folder, so that the synchronous endpoints still serve."""
    try:
        return JobStore(settings.job_dir, settings.job_ttl)
    except SegError:
        if os.environ.get("SEG_JOB_DIR"):
            raise
        return JobStore(Path(tempfile.gettempdir()) / f"seg-jobs-{os.getuid()}", settings.job_ttl)


JOBS = JobRunner(job_store(SETTINGS))  # started with the worker's predictor

ImageFile = Annotated[Path, Field(description="PNG, JPEG, BMP or TIFF; 8/16-bit, grey, RGB(A) or multi-channel")]
# strict, as the schema says: 64.0 for a tile, 0 for tta or true for a fraction are refused, not converted
MAX_REQUEST_TILE = min(SETTINGS.max_tile, MAX_TILE)  # SEG_MAX_TILE narrows the limits of TilingOptions
Tile = Annotated[
    int, Field(ge=MIN_TILE, le=MAX_REQUEST_TILE, strict=True, description="tile side (default: the model's)")
]
Overlap = Annotated[
    float, Field(ge=0.0, le=MAX_OVERLAP, strict=True, description="tile overlap fraction (default: the model's)")
]


def _tta_error(value: object, handler: Callable[[object], object]) -> object:
    """One message for a bad `tta`, not one per member of its union."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("tta", "Input should be none, flips, d4, true or false") from None


TTA = Annotated[
    Annotated[bool, Strict()] | Literal["none", "flips", "d4"],
    WrapValidator(_tta_error),
    Field(description="test-time augmentation: none, flips (4 runs per tile) or d4 (8: rotations and flips); "
          "true means flips, false none"),
]  # fmt: skip


class ClassCount(BaseModel):
    index: int
    name: str
    pixels: int
    fraction: float


class Mask(BaseModel):
    encoding: Literal["png", "rle", "none"] = Field(description="png: `data` is the base64 mask PNG; rle: see `values`")
    data: str | None = None
    values: list[int] | None = Field(None, description="rle: class of each run, row-major order")
    counts: list[int] | None = Field(None, description="rle: length of each run; sum = width x height")


class SegmentResult(BaseModel):
    model: str
    width: int
    height: int
    seconds: float = Field(description="time in the predictor")
    classes: list[ClassCount]
    mask: Mask


class ServiceInfo(ModelInfo):
    """/info: the model's `ModelInfo` (with `precision`: fp32, fp16 or int8), what runs it, and the server's limits."""

    provider: str
    device: str
    model_file: str = Field(description="the name of the ONNX file running (SEG_MODEL, or its int8 model: SEG_PRECISION)")
    worker: int = Field(description="this worker's index, from 1 (SEG_WORKERS=N runs N)")
    gpu: int | None = Field(
        None, json_schema_extra={"nullable": True},  # BentoML's schema keeps only the int otherwise
        description="the CUDA device id this worker uses: worker i has GPU (i - 1) mod the GPUs; null on the CPU",
    )
    limits: dict


# The page at /ui: one static file that calls the endpoints below (open even with SEG_API_KEY, which it asks for).
UI = Starlette(routes=[Mount("/", StaticFiles(directory=Path(__file__).with_name("ui"), html=True))])


@bentoml.asgi_app(UI, path="/ui")
@bentoml.service(
    name="seg",
    # The gate answers 504 past SEG_TIMEOUT from a body's arrival and 429 past SEG_CONCURRENCY; BentoML's own
    # timeout, from the request's start, only backs it up (an upload may take SETTINGS.upload_seconds).
    traffic={"timeout": SETTINGS.timeout + SETTINGS.upload_seconds + 30},
    workers=SETTINGS.workers,
)
class Segmentation:
    """Semantic segmentation of images of any size with one exported seg model."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels  # sizes are checked from the header first
        self.worker = bentoml.server_context.worker_index or 1
        gpus = gpu_count() if self.settings.device != "cpu" else 0
        self.gpu = (self.worker - 1) % gpus if gpus else None
        self.predictor = Predictor.from_onnx(
            self.settings.model, device=self.settings.device, gpu=self.gpu or 0, precision=self.settings.precision
        )
        if self.predictor.device != "cuda":
            self.gpu = None
        stop_on_signals()
        JOBS.start_with(self.predictor)

    @bentoml.api(route="/segment")
    @client_errors
    def segment(
        self, image: ImageFile, tile: Tile | None = None, overlap: Overlap | None = None, tta: TTA = "none"
    ) -> Annotated[Path, ContentType("image/png")]:
        """The label mask: a palette PNG of the image's width and height, pixel value = class index."""
        _, result = self._predict(image, tile, overlap, tta, request_check(self.settings.timeout))
        png = png_bytes(imageio.mask_image(result.mask, self.predictor.info.palette))
        return Response(png, media_type="image/png", headers=timing(result))

    @bentoml.api(route="/segment_json")
    @client_errors
    def segment_json(
        self,
        image: ImageFile,
        tile: Tile | None = None,
        overlap: Overlap | None = None,
        tta: TTA = "none",
        mask: Literal["png", "rle", "none"] = "png",
    ) -> SegmentResult:
        """Pixels and fraction per class, image size, model name, time, and the mask (PNG base64 or RLE)."""
        _, result = self._predict(image, tile, overlap, tta, request_check(self.settings.timeout))
        labels = result.mask
        counts = result.pixels_per_class(self.predictor.info.classes)
        classes = [
            ClassCount(index=i, name=name, pixels=n, fraction=n / labels.size)
            for i, (name, n) in enumerate(counts.items())
        ]
        if mask == "png":
            png = png_bytes(imageio.mask_image(labels, self.predictor.info.palette))
            encoded = Mask(encoding="png", data=base64.b64encode(png).decode())
        elif mask == "rle":
            values, lengths = run_lengths(labels)
            encoded = Mask(encoding="rle", values=values.tolist(), counts=lengths.tolist())
        else:
            encoded = Mask(encoding="none")
        return SegmentResult(
            model=self.predictor.info.name, width=labels.shape[1], height=labels.shape[0],
            seconds=round(result.seconds, 4), classes=classes, mask=encoded,
        )  # fmt: skip

    @bentoml.api(route="/overlay")
    @client_errors
    def overlay(
        self,
        image: ImageFile,
        tile: Tile | None = None,
        overlap: Overlap | None = None,
        tta: TTA = "none",
        alpha: Annotated[float, Field(ge=0.0, le=1.0, strict=True, description="opacity of the mask colours")] = 0.5,
        format: Literal["png", "jpeg"] = "png",
    ) -> Annotated[Path, ContentType("image/*")]:
        """The image (as 8-bit RGB) with the mask's classes blended in colour; class 0 stays uncoloured."""
        check = request_check(self.settings.timeout)
        pixels, result = self._predict(image, tile, overlap, tta, check)
        bands = overlay_bands(pixels, result.mask, self.predictor.info.palette, alpha, check)
        data = encode_bands(bands, *result.mask.shape, format)
        return Response(data, media_type=f"image/{format}", headers=timing(result))

    @bentoml.api(route="/preview")
    @client_errors
    def preview(self, image: ImageFile) -> Annotated[Path, ContentType("image/png")]:
        """The image as 8-bit RGB, stretched as /overlay stretches it (for TIFF and 16-bit images, which
        browsers do not show); the model does not run."""
        check = request_check(self.settings.timeout)
        pixels = read_upload(image, self.settings, self.predictor.info.in_channels)
        bands = (rgb for _, rgb in display_bands(pixels, check))
        return Response(encode_bands(bands, *pixels.shape[:2], "png"), media_type="image/png")

    @bentoml.api(route="/info")
    def info(self) -> ServiceInfo:
        """The loaded model's metadata, the execution provider in use and the server's limits."""
        s = self.settings
        return ServiceInfo(
            **dict(self.predictor.info), provider=self.predictor.provider, device=self.predictor.device,
            model_file=self.predictor.path.name, worker=self.worker, gpu=self.gpu,
            limits={"max_bytes": s.max_bytes, "max_pixels": s.max_pixels, "max_side": s.max_side,
                    "max_decode_bytes": s.max_decode_bytes, "tile": [MIN_TILE, MAX_REQUEST_TILE],
                    "overlap": [0.0, MAX_OVERLAP], "tta": list(TTA_LEVELS), "timeout": s.timeout,
                    "concurrency": s.concurrency, "header_timeout": s.header_timeout,
                    "body_timeout": s.body_timeout, "min_body_rate": s.min_body_rate, "job_max_bytes": s.job_max_bytes,
                    "job_max_pixels": s.job_max_pixels, "job_queue": s.job_queue, "job_ttl": s.job_ttl},
        )  # fmt: skip

    def _predict(
        self, path: Path, tile: int | None, overlap: float | None, tta: str | bool, check: Callable[[], None]
    ) -> tuple[np.ndarray, Prediction]:
        """(image, prediction) for an uploaded file, with this request's tiling; `check` runs between tile batches."""
        check()  # a request that waited for the model may be past its deadline already
        image = read_upload(path, self.settings, self.predictor.info.in_channels)
        options = self.predictor.options.replace(tile=tile, overlap=overlap, tta=tta)  # checked by the schema too
        return image, self.predictor.predict(image, options, check=check)


def label_metrics_by_route(known: Iterable[str]) -> None:
    """Make BentoML's request metrics label a request by its route: a known path as itself, any page under
    /ui/ as "/ui/", anything else as "other". BentoML labels by the raw path, so made-up paths would each add
    series to /metrics without bound (and show other clients' paths)."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    if getattr(Metrics, "labelled_by_route", False):
        return
    known, original = frozenset(known), Metrics.__call__

    async def call(self, scope, receive, send):
        path = scope.get("path", "")
        prefix = next((p for p in ("/ui/", "/jobs/") if path.startswith(p)), None)
        label = path if path in known else prefix or "other"
        if scope.get("type") != "http" or label == path:
            return await original(self, scope, receive, send)
        inner, proxy = self.app, copy.copy(self)
        proxy.app = lambda s, r, se: inner({**s, "path": path}, r, se)  # the app still sees the real path
        await original(proxy, {**scope, "path": label}, receive, send)

    Metrics.__call__, Metrics.labelled_by_route = call, True


header_deadline(SETTINGS.header_timeout)
label_metrics_by_route([method.route for method in Segmentation.apis.values()]
                       + ["/", "/metrics", "/livez", "/readyz", "/healthz", "/docs.json", "/ui", "/jobs"])
Segmentation.add_asgi_middleware(
    Gate,
    routes=[method.route for method in Segmentation.apis.values()],
    upload_routes=[method.route for method in Segmentation.apis.values() if "image" in method.input_spec.model_fields],
    max_bytes=SETTINGS.max_bytes,
    api_key=SETTINGS.api_key,
    concurrency=math.ceil(SETTINGS.concurrency / SETTINGS.workers),  # each worker its share, as BentoML's own
    timeout=SETTINGS.timeout,
    body_timeout=SETTINGS.body_timeout,
    min_body_rate=SETTINGS.min_body_rate,
    job_max_bytes=SETTINGS.job_max_bytes,
    paths=openapi_paths((MIN_TILE, MAX_REQUEST_TILE), MAX_OVERLAP),
)
Segmentation.add_asgi_middleware(
    JobRoutes, runner=JOBS, settings=SETTINGS, tile_range=(MIN_TILE, MAX_REQUEST_TILE), max_overlap=MAX_OVERLAP
)


def read_upload(path: Path, limits: Settings, model_channels: int) -> np.ndarray:
    """The uploaded image as an array; its size, channels and decoded bytes are checked from the header first."""
    data = path.read_bytes()
    try:
        height, width, channels, per_pixel = dataclasses.astuple(header_shape(data))
    except Image.DecompressionBombError:
        raise TooLarge(f"image is over the limit of {Image.MAX_IMAGE_PIXELS} pixels (SEG_MAX_PIXELS)") from None
    size = f"image of {width} x {height} pixels"
    if max(height, width) > limits.max_side:
        raise TooLarge(f"{size} has a side over the limit of {limits.max_side} pixels (SEG_MAX_SIDE)")
    if height * width > limits.max_pixels:
        raise TooLarge(f"{size} is over the limit of {limits.max_pixels} pixels (SEG_MAX_PIXELS)")
    if height * width * per_pixel > limits.max_decode_bytes:
        raise TooLarge(
            f"{size} at {per_pixel} bytes per pixel decodes to {height * width * per_pixel} bytes, over the "
            f"limit of {limits.max_decode_bytes} bytes (SEG_MAX_DECODE_BYTES)"
        )
    if channels > 4 and channels != model_channels:  # e.g. a stack of many pages: refuse before decoding
        raise ImageError(f"image has {channels} channels; the model takes {model_channels}")
    return imageio.decode_image(data, "image")
