"""Images as people have them: EXIF orientation, TIFF photometric interpretations, multi-page TIFF stacks
(slices unless the file says channels) and the formats seg reads (PNG, JPEG, BMP, TIFF; others refused),
through the Python API, `seg predict` and the HTTP service."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from seg.cli import app
from seg.errors import ImageError
from seg.inference.predictor import Predictor
from seg.inference.tiling import TilingOptions
from seg.io.headers import image_size
from seg.io.images import decode_image, orient, read_image, read_mask
from seg.io.sources import TiffSource
from seg.io.tiff import tiff_layout

from conftest import SAMPLES
from helpers import running_server

runner = CliRunner()
EM = np.asarray(Image.open(SAMPLES / "isbi_test_00.png"))


def predict_cli(*args) -> tuple[int, str, dict]:
    out = Path(args[args.index("--out") + 1])
    result = runner.invoke(app, ["predict", *map(str, args)])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return result.exit_code, result.output, summary


def phone_jpeg(path: Path, orientation: int = 6) -> np.ndarray:
    """A JPEG stored 300 wide and 200 high with an EXIF orientation; returns the stored pixels as decoded."""
    image = Image.fromarray(EM[:200, :300])
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))  # Pillow without exif_transpose: as stored


# -- EXIF orientation -----------------------------------------------------------------------------------
def test_rotated_phone_jpeg_is_segmented_as_shown(conv_onnx, tmp_path):
    (tmp_path / "in").mkdir()
    stored = phone_jpeg(tmp_path / "in" / "phone.jpg")
    shown = orient(stored, 6)
    assert shown.shape == (300, 200)  # 300 high, 200 wide
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")

    assert np.array_equal(read_image(tmp_path / "in" / "phone.jpg"), shown)
    assert np.array_equal(decode_image((tmp_path / "in" / "phone.jpg").read_bytes()), shown)
    assert image_size(tmp_path / "in" / "phone.jpg") == (300, 200)
    expected = predictor.predict(shown).mask
    assert predictor.predict(read_image(tmp_path / "in" / "phone.jpg")).mask.shape == (300, 200)
    predictor.predict_file(tmp_path / "in" / "phone.jpg", tmp_path / "api.png")
    assert np.array_equal(read_mask(tmp_path / "api.png"), expected)

    code, _, summary = predict_cli(conv_onnx, tmp_path / "in", "--out", tmp_path / "out", "--overlay")
    assert code == 0
    assert (summary["images"][0]["height"], summary["images"][0]["width"]) == (300, 200)
    assert np.array_equal(read_mask(tmp_path / "out" / "phone.png"), expected)
    with Image.open(tmp_path / "out" / "phone.overlay.png") as im:
        assert im.size == (200, 300)
    code, _, summary = predict_cli(conv_onnx, tmp_path / "in", "--out", tmp_path / "out", "--overlay")
    assert code == 0 and summary["images"][0]["status"] == "skipped"  # the resume check sees the shown size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_as_pillow_turns_it_also_past_the_bomb_limit(conv_onnx, tmp_path, orientation, monkeypatch):
    stored = phone_jpeg(tmp_path / "p.jpg", orientation)
    with Image.open(tmp_path / "p.jpg") as im:
        from PIL import ImageOps

        reference = np.asarray(ImageOps.exif_transpose(im).convert("L"))
    assert np.array_equal(orient(stored, orientation), reference)
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # decoded by imagecodecs, turned by seg
        predictor.predict_file(tmp_path / "p.jpg", tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), predictor.predict(read_image(tmp_path / "p.jpg")).mask)


def test_training_turns_image_and_mask_alike(tmp_path):
    from seg.config import DataConfig
    from seg.data.samples import Sample, load_pair

    phone_jpeg(tmp_path / "img.jpg", 6)
    labels = (EM[:200, :300] > 128).astype(np.uint8)
    mask = Image.fromarray(labels * 255)
    exif = mask.getexif()
    exif[0x0112] = 6
    mask.save(tmp_path / "mask.png", exif=exif)
    data = DataConfig(root=tmp_path, in_channels=1, classes=["background", "foreground"])

    image, target = load_pair(Sample("img", tmp_path / "img.jpg", tmp_path / "mask.png"), data)

    assert image.shape[:2] == target.shape == (300, 200)
    assert np.array_equal(target, orient(labels, 6))
    assert image_size(tmp_path / "mask.png") == (300, 200)  # from the PNG's eXIf chunk, not decoded


def test_one_header_reading_for_files_and_uploads(tmp_path):
    """`seg predict` (files) and the service (uploaded bytes) read sizes from headers by one function."""
    from seg.io.headers import HeaderShape, header_shape

    grey16 = (EM[:200, :300].astype(np.uint16) * 257)
    Image.fromarray(EM[:200, :300]).convert("RGB").save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(EM[:200, :300]).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", np.stack([grey16] * 3, axis=-1), photometric="rgb")
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([grey16] * 12), metadata={"axes": "ZYX"})
    expected = {"a.jpg": HeaderShape(200, 300, 3, 3), "a.png": HeaderShape(200, 300, 1, 1),
                "a.tif": HeaderShape(200, 300, 3, 6), "stack.tif": HeaderShape(200, 300, 1, 2)}  # fmt: skip
    for name, shape in expected.items():
        path = tmp_path / name
        assert header_shape(path) == header_shape(path.read_bytes()) == shape, name
        assert image_size(path) == (200, 300)
    with pytest.raises(ImageError, match="upload: empty file"):
        header_shape(b"", "upload")


# -- TIFF photometric interpretation --------------------------------------------------------------------
def _rgb_picture() -> np.ndarray:
    crop = EM[:96, :128].astype(np.int32)
    return np.stack([crop, 255 - crop, (crop + 80) % 256], axis=-1).astype(np.uint8)


def _palette_case():
    indices = (EM[:96, :128] // 16).astype(np.uint8)  # 16 colours
    table = np.stack([np.arange(16) * 17, 255 - np.arange(16) * 17, np.full(16, 60)], axis=1).astype(np.uint8)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :16] = table.T.astype(np.uint16) * 257
    return indices, {"photometric": "palette", "colormap": colormap}, table[indices]


def _cmyk_case():
    rgb = _rgb_picture().astype(np.float32)
    k = 255 - rgb.max(axis=2, keepdims=True)
    cmy = np.where(k < 255, (255 - rgb - k) * 255 / np.maximum(255 - k, 1), 0)
    cmyk = np.rint(np.concatenate([cmy, k], axis=2)).astype(np.uint8)
    c, kk = cmyk[..., :3].astype(np.float32), cmyk[..., 3:].astype(np.float32)
    expected = np.rint((255 - c) * (255 - kk) / 255).astype(np.uint8)
    return cmyk, {"photometric": "separated"}, expected


def _ycbcr_case():
    rgb = _rgb_picture().astype(np.float32)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    cb = (rgb[..., 2] - y) / 1.772 + 128
    cr = (rgb[..., 0] - y) / 1.402 + 128
    stored = np.rint(np.stack([y, cb, cr], axis=-1)).clip(0, 255).astype(np.uint8)
    return stored, {"photometric": "ycbcr", "subsampling": (1, 1)}, rgb  # compared with a tolerance


PHOTOMETRIC = {
    "palette": _palette_case,
    "miniswhite-8bit": lambda: (EM[:96, :128], {"photometric": "miniswhite"}, 255 - EM[:96, :128]),
    "miniswhite-12bit": lambda: (
        EM[:96, :128].astype(np.uint16) * 16, {"photometric": "miniswhite", "bitspersample": 12},
        (4095 - EM[:96, :128].astype(np.uint16) * 16).astype(np.uint16),
    ),
    "cmyk": _cmyk_case,
    "cmyk-striped-zlib": lambda: (lambda c: (c[0], {**c[1], "rowsperstrip": 16, "compression": "zlib"}, c[2]))(_cmyk_case()),
    "ycbcr": _ycbcr_case,
    "ycbcr-jpeg": lambda: (_rgb_picture(), {"photometric": "rgb", "compression": "jpeg"}, None),  # stored as YCbCr
}


def _decoded_tolerance(name: str) -> float:
    return {"ycbcr": 1.0}.get(name, 0.0)


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_tiff_photometric_becomes_what_it_shows(conv_onnx_factory, tmp_path, name):
    stored, options, expected = PHOTOMETRIC[name]()
    tifffile.imwrite(tmp_path / "in.tif", stored, **options)
    tolerance = _decoded_tolerance(name)
    if expected is None:  # lossy: as libtiff (through Pillow) decodes it
        expected = np.asarray(Image.open(tmp_path / "in.tif").convert("RGB"))
    with tifffile.TiffFile(tmp_path / "in.tif") as tif:  # the file really is of that interpretation
        assert tif.pages.first.photometric.name.lower() in name.replace("cmyk", "separated").replace("-jpeg", "")

    whole = read_image(tmp_path / "in.tif")
    decoded = decode_image((tmp_path / "in.tif").read_bytes())
    with TiffSource(tmp_path / "in.tif") as source:
        bands = np.concatenate([source.read(y, y + 20) for y in range(0, source.height, 20)])
    for array in (whole, decoded, bands.reshape(whole.shape)):
        assert array.shape == expected.shape and array.dtype == np.asarray(stored).dtype
        assert np.abs(array.astype(np.float32) - expected).mean() <= tolerance, name

    channels = 1 if whole.ndim == 2 else whole.shape[2]
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=channels), device="cpu", options=TilingOptions(tile=64))
    predictor.predict_file(tmp_path / "in.tif", tmp_path / "mask.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), predictor.predict(whole).mask)


UNSUPPORTED = {
    "CIELAB": lambda: (_rgb_picture(), {"photometric": "cielab"}),
    "LOGLUV": lambda: (np.ones((40, 50, 3), np.float32), {"photometric": 32845}),
    "6 inks": lambda: (np.zeros((40, 50, 6), np.uint8), {"photometric": "separated", "extratags": [(334, "H", 1, 6, True)]}),
    "inkset": lambda: (np.zeros((40, 50, 4), np.uint8), {"photometric": "separated", "extratags": [(332, "H", 1, 2, True)]}),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_photometric_is_a_clear_error(conv_onnx_factory, tmp_path, name):
    stored, options = UNSUPPORTED[name]()
    tifffile.imwrite(tmp_path / "in.tif", stored, **options)
    words = {"CIELAB": "CIELAB is not supported", "LOGLUV": "LOGLUV is not supported"}.get(name, "inks is not supported")
    for read in (read_image, lambda p: decode_image(p.read_bytes()), TiffSource):
        with pytest.raises(ImageError, match=words):
            read(tmp_path / "in.tif")
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu")
    with pytest.raises(ImageError, match=words):
        predictor.predict_file(tmp_path / "in.tif", tmp_path / "mask.png")
    assert not (tmp_path / "mask.png").exists()


def test_seg_predict_reads_palette_tiffs_as_colours_and_refuses_cielab(conv_onnx_factory, tmp_path):
    model = conv_onnx_factory(in_channels=3)
    (tmp_path / "in").mkdir()
    indices, options, colours = _palette_case()
    tifffile.imwrite(tmp_path / "in" / "palette.tif", indices, **options)
    tifffile.imwrite(tmp_path / "in" / "lab.tif", _rgb_picture(), photometric="cielab")

    code, output, summary = predict_cli(model, tmp_path / "in", "--out", tmp_path / "out")

    assert code == 1
    entries = {Path(e["input"]).name: e for e in summary["images"]}
    assert entries["palette.tif"]["status"] == "ok" and entries["palette.tif"]["channels"] == 3
    expected = Predictor.from_onnx(model, device="cpu").predict(colours).mask
    assert np.array_equal(read_mask(tmp_path / "out" / "palette.png"), expected)
    assert entries["lab.tif"]["status"] == "failed"
    assert "photometric interpretation CIELAB is not supported" in entries["lab.tif"]["error"]
    assert "Traceback" not in output and not (tmp_path / "out" / "lab.png").exists()


def test_palette_tiff_mask_gives_its_indices(tmp_path):
    indices, options, _ = _palette_case()
    tifffile.imwrite(tmp_path / "mask.tif", indices, **options)
    assert np.array_equal(read_mask(tmp_path / "mask.tif"), indices)


# -- multi-page TIFFs: slices unless the file says channels ---------------------------------------------
@pytest.mark.parametrize(
    ("shape", "axes", "slices", "image"),
    [
        ((5, 70, 90), "QYX", 5, (70, 90, 1)),  # tifffile.imwrite of a (Z, Y, X) array
        ((5, 70, 90), "IYX", 5, (70, 90, 1)),  # plain multi-page file
        ((4, 70, 90), "ZYX", 4, (70, 90, 1)),  # ImageJ z-stack
        ((3, 4, 70, 90), "TZYX", 12, (70, 90, 1)),
        ((2, 70, 90), "CYX", 1, (70, 90, 2)),  # ImageJ or OME channels
        ((6, 2, 70, 90), "ZCYX", 6, (70, 90, 2)),  # slices of two channels
        ((3, 70, 90), "SYX", 1, (70, 90, 3)),  # planar RGB
        ((70, 90, 3), "YXS", 1, (70, 90, 3)),
        ((4, 70, 90, 3), "IYXS", 4, (70, 90, 3)),  # a stack of RGB pages
        ((70, 90, 5), "QYX", 1, (70, 90, 5)),  # tifffile's pages of an (H, W, C) array, 5 wide
        ((1, 70, 90, 4), "QQYX", 1, (70, 90, 4)),
        ((1, 70, 90), "ZYX", 1, (70, 90, 1)),
    ],
)
def test_tiff_layout_rule(shape, axes, slices, image):
    layout = tiff_layout(shape, axes)
    assert (layout.slices, layout.image_shape) == (slices, image)


def _stack(slices: int = 3, height: int = 300, width: int = 200) -> np.ndarray:
    tiles = [np.roll(EM, 37 * i, axis=(0, 1))[:height, :width] for i in range(slices)]
    return np.stack(tiles)


@pytest.mark.parametrize("writer", ["imagej", "tifffile", "ome"])
def test_seg_predict_segments_a_stack_slice_by_slice(conv_onnx, tmp_path, writer):
    stack = _stack()
    (tmp_path / "in").mkdir()
    options = {
        "imagej": {"imagej": True, "metadata": {"axes": "ZYX"}},
        "tifffile": {"photometric": "minisblack", "compression": "zlib"},
        "ome": {"ome": True, "metadata": {"axes": "ZYX"}, "photometric": "minisblack", "tile": (64, 64)},
    }[writer]
    tifffile.imwrite(tmp_path / "in" / "stack.tif", stack, **options)
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    with pytest.raises(ImageError, match="stack of 3 slices.*seg predict"):
        read_image(tmp_path / "in" / "stack.tif")
    with pytest.raises(ImageError, match="stack of 3 slices"):
        predictor.predict_file(tmp_path / "in" / "stack.tif", tmp_path / "m.png")  # never the first slice alone

    code, _, summary = predict_cli(conv_onnx, tmp_path / "in", "--out", tmp_path / "out", "--format", "png", "--overlay")

    assert code == 0
    (entry,) = summary["images"]
    assert entry["slices"] == 3 and (entry["height"], entry["width"]) == (300, 200) and "page per slice" in entry["note"]
    assert entry["outputs"]["mask"].endswith("stack.tif") and not (tmp_path / "out" / "stack.png").exists()
    masks = tifffile.imread(tmp_path / "out" / "stack.tif")
    assert masks.shape == (3, 300, 200)
    for page, image in zip(masks, stack):
        assert np.array_equal(page, predictor.predict(image).mask)
    assert sum(entry["pixels_per_class"].values()) == 3 * 300 * 200
    assert tifffile.imread(tmp_path / "out" / "stack.overlay.tif").shape == (3, 300, 200, 3)

    code, _, summary = predict_cli(conv_onnx, tmp_path / "in", "--out", tmp_path / "out", "--format", "png", "--overlay")
    assert code == 0 and summary["images"][0]["status"] == "skipped"


@pytest.mark.parametrize(
    "options",
    [
        {"imagej": True, "metadata": {"axes": "ZCYX"}},  # uncompressed, contiguous: read at offsets
        {"photometric": "minisblack", "metadata": {"axes": "ZCYX"}, "compression": "zlib", "tile": (64, 64)},
        {"photometric": "minisblack", "metadata": {"axes": "ZCYX"}, "compression": "zlib", "rowsperstrip": 2100},
    ],
    ids=["contiguous", "tiled", "one-tall-strip"],
)
def test_slices_read_by_bands_are_the_stack(tmp_path, options):
    stack = np.random.default_rng(0).integers(0, 60000, (3, 2, 2100, 70)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, **options)
    with TiffSource(tmp_path / "s.tif") as source:
        assert (source.slices, source.height, source.width, source.channels) == (3, 2100, 70, 2)
        for number in (2, 0, 1):
            source.select(number)
            bands = np.concatenate([source.read(y, y + 500) for y in range(0, source.height, 500)])
            assert np.array_equal(bands, np.moveaxis(stack[number], 0, -1))


def test_channels_said_by_the_file_are_channels(conv_onnx_factory, tmp_path):
    """ImageJ 'ZCYX': 4 slices of 2 channels; OME 'CYX': one image of 2 channels."""
    stack = _stack(8).reshape(4, 2, 300, 200)
    tifffile.imwrite(tmp_path / "zc.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "c.tif", stack[1], ome=True, metadata={"axes": "CYX"}, photometric="minisblack")
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=2), device="cpu")

    predictor.predict_file(tmp_path / "zc.tif", tmp_path / "zc_mask.tif", probabilities_path=tmp_path / "p.tif")  # a stack
    masks = tifffile.imread(tmp_path / "zc_mask.tif")
    assert masks.shape == (4, 300, 200)
    for page, image in zip(masks, stack):
        assert np.array_equal(page, predictor.predict(np.moveaxis(image, 0, -1)).mask)
    assert tifffile.imread(tmp_path / "p.tif").shape == (4, 300, 200, 2)

    summary = predictor.predict_file(tmp_path / "c.tif", tmp_path / "c_mask.png")
    assert summary["channels"] == 2
    assert np.array_equal(read_mask(tmp_path / "c_mask.png"), predictor.predict(np.moveaxis(stack[1], 0, -1)).mask)


def test_a_stack_is_read_one_slice_at_a_time(conv_onnx, tmp_path):
    """Peak memory does not grow with the number of slices."""
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    peaks = []
    for slices in (2, 96):
        stack = np.tile(_stack(2, 256, 256), (slices // 2, 1, 1))
        tifffile.imwrite(tmp_path / f"s{slices}.tif", stack, photometric="minisblack", compression="zlib")
        del stack
        tracemalloc.start()
        predictor.predict_file(tmp_path / f"s{slices}.tif", tmp_path / f"m{slices}.tif")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert tifffile.imread(tmp_path / "m96.tif").shape == (96, 256, 256)
    assert peaks[1] < peaks[0] + 1_500_000, peaks  # the whole stack would add 6 MB


# -- formats --------------------------------------------------------------------------------------------
def _other_formats(folder: Path) -> dict[str, Path]:
    picture = Image.fromarray(EM[:64, :80])
    paths = {"GIF": folder / "a.gif", "WebP": folder / "b.webp", "PSD-named-png": folder / "c.png"}
    picture.save(paths["GIF"], format="GIF")
    picture.save(paths["WebP"], format="WEBP")
    picture.save(folder / "disguised.png", format="GIF")  # a GIF behind a .png name
    paths["GIF-named-png"] = folder / "disguised.png"
    paths["PSD-named-png"].write_bytes(b"8BPS\x00\x01" + bytes(100))
    return paths


def test_other_formats_are_refused_by_name(conv_onnx, tmp_path):
    paths = _other_formats(tmp_path)
    expected = {"GIF": "GIF", "WebP": "WebP", "GIF-named-png": "GIF", "PSD-named-png": "PSD"}
    for kind, path in paths.items():
        message = f"unsupported format {expected[kind]}; use PNG, JPEG, BMP or TIFF"
        for read in (read_image, read_mask, lambda p: decode_image(p.read_bytes())):
            with pytest.raises(ImageError, match=message):
                read(path)
        assert image_size(path) is None

    code, output, summary = predict_cli(conv_onnx, *paths.values(), "--out", tmp_path / "out")
    assert code == 1 and summary["failed"] == 4
    for entry in summary["images"]:
        assert "unsupported format" in entry["error"] and "use PNG, JPEG, BMP or TIFF" in entry["error"]
    assert "Traceback" not in output


def test_service_refuses_other_formats_and_stacks_and_turns_phone_photos(conv_onnx, tmp_path):

    paths = _other_formats(tmp_path)
    tifffile.imwrite(tmp_path / "stack.tif", _stack(), imagej=True, metadata={"axes": "ZYX"})
    phone_jpeg(tmp_path / "phone.jpg", 6)
    with running_server(conv_onnx, tmp_path, SEG_DEVICE="cpu") as server:
        for kind in ("GIF", "WebP"):
            response = httpx.post(server.url + "/segment", files={"image": ("x", paths[kind].read_bytes())}, timeout=60)
            assert response.status_code == 400, response.text
            assert response.json()["error"] == f"image: unsupported format {kind}; use PNG, JPEG, BMP or TIFF"
        response = httpx.post(server.url + "/segment", content=(tmp_path / "stack.tif").read_bytes(), timeout=60)
        assert response.status_code == 400
        assert "stack of 3 slices" in response.json()["error"] and "seg predict" in response.json()["error"]
        response = httpx.post(server.url + "/segment", content=(tmp_path / "phone.jpg").read_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        with Image.open(io.BytesIO(response.content)) as mask:
            assert mask.size == (200, 300)


@pytest.mark.parametrize("photometric", ["minisblack", "miniswhite"])
def test_bilevel_tiff_reads_as_0_and_255_like_a_1_bit_png(tmp_path, em_image, photometric):
    """A 1-bit TIFF is black and white, as Pillow reads a 1-bit PNG: not 0 and 1 (nearly black to a model)."""
    shown = em_image > 128
    stored = shown if photometric == "minisblack" else ~shown
    tifffile.imwrite(tmp_path / "bits.tif", stored, photometric=photometric)
    Image.fromarray(shown).save(tmp_path / "bits.png")  # mode "1"
    expected = read_image(tmp_path / "bits.png")
    assert set(np.unique(expected)) == {0, 255}
    np.testing.assert_array_equal(read_image(tmp_path / "bits.tif"), expected)
    with TiffSource(tmp_path / "bits.tif") as source:
        np.testing.assert_array_equal(source.read(100, 300)[..., 0], expected[100:300])


def test_palette_tiff_header_counts_its_rgb_colours(tmp_path):
    from seg.io.headers import header_shape

    colormap = np.stack([np.arange(256) * 257] * 3).astype(np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((40, 50), np.uint8), photometric="palette", colormap=colormap)
    shape = header_shape(tmp_path / "p.tif")
    assert (shape.height, shape.width, shape.channels, shape.bytes_per_pixel) == (40, 50, 3, 3)
    assert read_image(tmp_path / "p.tif").shape == (40, 50, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_image_size_past_the_bomb_limit(tmp_path, em_image, fmt, monkeypatch):
    """Resume checks need the size of images Pillow refuses to open: read from the header's bytes."""
    Image.fromarray(em_image[:300, :200]).save(tmp_path / "big", format=fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60000 pixels are now past twice the limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big")
    assert image_size(tmp_path / "big") == (300, 200)
