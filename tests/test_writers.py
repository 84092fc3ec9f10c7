"""seg.io.writers: files written by row bands of any height equal the image, are renamed only when complete,
and `output_is_whole` tells a finished file from a cut one; pyramidal OME-TIFFs read back by tifffile and
ome-types, in memory bounded by a few bands."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import ome_types
import pytest
import tifffile
from PIL import Image

from seg.errors import SegError
from seg.io.writers import band_writer, output_is_whole, page_writer, pyramid_sizes

from conftest import SAMPLES


def _em(dtype=np.uint8) -> np.ndarray:
    em = np.asarray(Image.open(SAMPLES / "isbi_test_00.png"))[:300, :257]
    return em.astype(np.uint16) * 257 if dtype == np.uint16 else em.astype(dtype)


def _write(path, image: np.ndarray, bands=(1, 7, 100, 64)) -> None:
    samples = 1 if image.ndim == 2 else image.shape[2]
    with band_writer(path, image.shape[0], image.shape[1], image.dtype, samples) as writer:
        y, i = 0, 0
        while y < image.shape[0]:
            rows = bands[i % len(bands)]
            writer.write(image[y : y + rows])
            y, i = y + rows, i + 1


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("kind", ["grey8", "grey16", "rgb8"])
def test_bands_of_any_height_make_the_image(tmp_path, suffix, kind):
    image = {"grey8": _em(), "grey16": _em(np.uint16), "rgb8": np.stack([_em(), _em()[::-1], 255 - _em()], -1)}[kind]
    _write(tmp_path / f"out{suffix}", image)
    back = tifffile.imread(tmp_path / "out.tif") if suffix == ".tif" else np.asarray(Image.open(tmp_path / "out.png"))
    assert back.dtype == image.dtype and np.array_equal(back, image)
    assert output_is_whole(tmp_path / f"out{suffix}", *image.shape[:2])
    assert not output_is_whole(tmp_path / f"out{suffix}", image.shape[0] + 1, image.shape[1])


def test_float_probabilities_go_to_tiff(tmp_path):
    probs = np.random.default_rng(0).random((300, 257, 3), dtype=np.float32)
    _write(tmp_path / "p.tif", probs)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "p.tif"), probs)
    with pytest.raises(SegError, match="PNG holds 8/16-bit"):
        _write(tmp_path / "p.png", probs)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".ome.tif", ".geojson"])
def test_a_failure_leaves_no_file(tmp_path, suffix):
    image = _em()
    with pytest.raises(RuntimeError, match="stop"):
        with band_writer(tmp_path / f"out{suffix}", *image.shape, image.dtype) as writer:
            writer.write(image[:100])
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_pages_are_one_stack(tmp_path):
    pages = [_em(), _em()[::-1], 255 - _em()]
    with page_writer(tmp_path / "stack.tif") as write:
        for page in pages:
            write(page)
    assert np.array_equal(tifffile.imread(tmp_path / "stack.tif"), np.stack(pages))


def _mosaic(height: int, width: int) -> np.ndarray:
    em = _em()
    return np.tile(em, (-(-height // em.shape[0]), -(-width // em.shape[1])))[:height, :width]


@pytest.mark.parametrize("height, width, levels", [(2300, 2900, 3), (1024, 700, 1), (1025, 40, 2)])
def test_ome_tiff_is_a_pyramid_of_every_other_pixel_down_to_1024(tmp_path, height, width, levels):
    image = _mosaic(height, width)
    path = tmp_path / "mask.ome.tif"
    with band_writer(path, height, width, np.uint8, pixel_size=(0.5, 0.25)) as writer:
        for y in range(0, height, 300):
            writer.write(image[y : y + 300])
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.tif"]  # the levels' own files are gone
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert len(series.levels) == levels == len(pyramid_sizes(height, width))
        assert max(series.levels[-1].shape) <= 1024
        for i, level in enumerate(series.levels):
            assert np.array_equal(level.asarray(), image[:: 2**i, :: 2**i]), i
            page = level.pages[0]
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        pixels = ome_types.from_xml(tif.ome_metadata).images[0].pixels
    assert (pixels.size_y, pixels.size_x, pixels.type.value) == (height, width, "uint8")
    assert (pixels.physical_size_y, pixels.physical_size_x) == (0.5, 0.25)
    assert pixels.physical_size_x_unit.value == "µm"
    assert output_is_whole(path, height, width)


def test_ome_tiff_is_written_in_memory_of_a_few_bands(tmp_path):
    """Against the plain tiled TIFF of the same bands (tifffile's batches of tiles are most of both)."""
    band, width, height = 256, 2048, 16384  # a 32 MB image; its smaller levels add 11 MB
    rows = _mosaic(band, width)

    def peak(name: str, height: int) -> int:
        tracemalloc.start()
        with band_writer(tmp_path / name, height, width, np.uint8) as writer:
            for _ in range(0, height, band):
                writer.write(rows)
        most = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return most

    peak("warm.ome.tif", 2048)  # tifffile and zarr imported before measuring
    plain, ome = peak("m.tif", height), peak("m.ome.tif", height)
    assert ome < 2 * plain and ome < height * width / 2, f"{ome / 1e6:.1f} MB against {plain / 1e6:.1f} MB"
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tif:
        assert [level.shape for level in tif.series[0].levels] == [(16384, 2048), (8192, 1024), (4096, 512), (2048, 256), (1024, 128)]


def _classes_mask(height: int, width: int) -> np.ndarray:
    """Three classes from real EM intensities, and a ring (a region with a hole) across many bands."""
    em = _mosaic(height, width)
    mask = np.digitize(em, [90, 170]).astype(np.uint8)  # 0, 1, 2
    yy, xx = np.mgrid[:height, :width]
    r = np.hypot(yy - height / 2, xx - width / 2)
    mask[(r > 40) & (r < 60)] = 1
    return mask


def test_geojson_is_one_valid_polygon_per_region_whatever_the_bands(tmp_path):
    from scipy import ndimage
    from shapely.geometry import shape

    mask = _classes_mask(300, 257)
    palette = [[0, 0, 0], [0, 160, 255], [255, 80, 0]]
    with band_writer(tmp_path / "m.geojson", *mask.shape, np.uint8, palette=palette, classes=["bg", "cell", "edge"]) as w:
        y, i = 0, 0
        while y < mask.shape[0]:
            rows = (1, 7, 100, 64)[i % 4]
            w.write(mask[y : y + rows])
            y, i = y + rows, i + 1
    doc = json.loads((tmp_path / "m.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    for c, name in ((1, "cell"), (2, "edge")):
        features = [f for f in doc["features"] if f["properties"]["classification"]["name"] == name]
        assert {tuple(f["properties"]["classification"]["color"]) for f in features} == {tuple(palette[c])}
        polygons = [shape(f["geometry"]) for f in features]
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
        assert len(polygons) == ndimage.label(mask == c)[1]  # 4-connected regions, joined across bands
        assert sum(p.area for p in polygons) == (mask == c).sum()
    ring = max((shape(f["geometry"]) for f in doc["features"]), key=lambda p: p.area)
    assert len(ring.interiors) >= 1
    assert output_is_whole(tmp_path / "m.geojson", *mask.shape)


def test_geojson_without_its_libraries_is_one_line(tmp_path, monkeypatch):
    import sys

    from seg.io.geojson import GEO_EXTRA

    monkeypatch.setitem(sys.modules, "rasterio.features", None)  # as if not installed
    with pytest.raises(SegError, match="seg\\[geo\\]"):
        with band_writer(tmp_path / "m.geojson", 10, 10, np.uint8, classes=["bg", "fg"]):
            pass
    assert list(tmp_path.iterdir()) == [] and "pip install" in GEO_EXTRA


def test_ome_zarr_is_written_in_memory_of_a_few_bands(tmp_path):
    """The image and its mask, 32 MB each, through OME-Zarr in bands of 256 rows: peak traced memory does not
    grow with the height, and each level is every other pixel of the one above."""
    from seg.io.sources import ArraySource

    band, width, height = 256, 2048, 16384
    rows = _mosaic(band, width)
    image = ArraySource(np.tile(rows, (height // band, 1)), "mosaic")
    mask = (rows > 128).astype(np.uint8)

    def write(name: str, height: int) -> int:
        tracemalloc.start()
        with band_writer(tmp_path / name, height, width, np.uint8, source=image, classes=["a", "b"], palette=[[0, 0, 0], [255, 0, 0]]) as writer:
            for _ in range(0, height, band):
                writer.write(mask)
        most = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return most

    write("warm.ome.zarr", 2048)
    short, most = write("short.ome.zarr", 4096), write("m.ome.zarr", height)
    assert most < 1.5 * short and most < height * width / 2, f"{most / 1e6:.1f} MB, {short / 1e6:.1f} MB for a quarter"
    import zarr

    labels = zarr.open_group(str(tmp_path / "m.ome.zarr" / "labels" / "mask"), mode="r")
    assert [labels[str(k)].shape for k in range(5)] == [(16384, 2048), (8192, 1024), (4096, 512), (2048, 256), (1024, 128)]
    assert np.array_equal(labels["3"][:32], mask[::8, ::8])
    assert output_is_whole(tmp_path / "m.ome.zarr", height, width)
    assert not output_is_whole(tmp_path / "m.ome.zarr", height, width + 1)
