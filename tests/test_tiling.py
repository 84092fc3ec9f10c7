"""The tiling's cost follows the pixel count for any shape, and its blend is exact for any shape."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from seg.errors import SegError
from seg.inference.tiling import MAX_TILE, MIN_TILE, TilingOptions, predict_tiled, round_up, softmax, tile_grid

THIN = [(1, 1_000_000), (1_000_000, 1), (10, 100_000), (100_000, 10), (3, 70_000)]


def pointwise(batch: np.ndarray) -> np.ndarray:
    """A model whose logits at a pixel depend on that pixel only: tiling must not change its output."""
    x = batch[:, :1]
    return np.concatenate([x, 1.0 - 2.0 * x, np.sin(5.0 * x)], axis=1)


def tile_pixels(height: int, width: int, tile: int = 512, overlap: float = 0.25) -> int:
    grid = tile_grid(height, width, tile, overlap, 32)
    return grid.tiles * grid.tile_y * grid.tile_x


@pytest.mark.parametrize("shape", THIN)
def test_tiles_fit_thin_images(shape):
    height, width = shape
    grid = tile_grid(height, width, 512, 0.25, 32)
    assert grid.tile_y <= round_up(3 * height, 32) and grid.tile_x <= round_up(3 * width, 32)
    assert grid.tile_y * grid.tile_x <= 512 * 512
    # Work per padded pixel is no worse than for the square image of the same pixel count.
    side = int(np.sqrt(height * width))
    padded = round_up(height, 32) * round_up(width, 32)
    assert tile_pixels(height, width) / padded <= tile_pixels(side, side) / round_up(side, 32) ** 2


@pytest.mark.parametrize("shape", [(1, 1), (1, 5000), (5000, 1), (7, 3), (10, 3000), (700, 33), (600, 1300)])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("edges", ["mirror", "inside"])
def test_blend_is_exact_for_any_shape(shape, batch_size, edges):
    rng = np.random.default_rng(0)
    image = rng.random((1, *shape), dtype=np.float32)
    expected = softmax(pointwise(image[None]))[0]
    options = TilingOptions(tile=256, batch_size=batch_size, edges=edges)
    bands = list(predict_tiled(lambda y0, y1: image[:, y0:y1], *shape, pointwise, options))
    assert [y0 for y0, _ in bands] == list(np.cumsum([0] + [p.shape[1] for _, p in bands[:-1]]))
    got = np.concatenate([p for _, p in bands], axis=1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def edge_aware(batch: np.ndarray) -> np.ndarray:
    """A model that sees where its input ends, as a zero-padded CNN does: the logits hold each pixel's
    distance to the tile's nearest edge."""
    n, _, h, w = batch.shape
    yy, xx = np.mgrid[:h, :w]
    distance = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx)).astype(np.float32)
    return np.concatenate([batch[:, :1], np.broadcast_to(distance / 32, (n, 1, h, w))], axis=1)


def test_inside_tiles_give_a_small_image_to_the_model_whole_as_a_training_crop_was():
    rng = np.random.default_rng(1)
    image = rng.random((1, 320, 256), dtype=np.float32)
    whole = softmax(edge_aware(image[None]))[0]
    predict = lambda edges: next(predict_tiled(lambda y0, y1: image[:, y0:y1], 320, 256, edge_aware,  # noqa: E731
                                               TilingOptions(tile=512, edges=edges)))[1]  # fmt: skip
    np.testing.assert_allclose(predict("inside"), whole, atol=1e-6)
    assert np.abs(predict("mirror") - whole).max() > 0.1  # the reflected margin moves the edges away


@pytest.mark.parametrize("shape", [(700, 600), (300, 1000), (40, 70)])
def test_inside_tiles_lie_within_the_image(shape):
    grid = tile_grid(*shape, 256, 0.25, 32, edges="inside")
    assert grid.margin_y == grid.margin_x == 0
    for starts, tile, length in ((grid.starts_y, grid.tile_y, shape[0]), (grid.starts_x, grid.tile_x, shape[1])):
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)  # flush with both edges
        assert tile <= max(256, round_up(length, 32)) and tile % 32 == 0


def test_edges_must_be_mirror_or_inside():
    with pytest.raises(SegError, match="edges 'zero'"):
        TilingOptions(edges="zero")


def traced_peak(height: int, width: int) -> int:
    """Peak numpy memory of a tiled prediction consumed band by band (the image itself excluded)."""
    image = np.zeros((1, height, width), np.float32)
    tracemalloc.start()
    for _ in predict_tiled(lambda y0, y1: image[:, y0:y1], height, width, pointwise, TilingOptions(tile=512)):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("shape", [(1, 1_200_000), (1_200_000, 1), (4, 300_000)])  # squares as big fit no batch: tiled too
def test_memory_follows_the_pixel_count(shape):
    side = int(np.sqrt(shape[0] * shape[1]))
    assert traced_peak(*shape) < 2 * traced_peak(side, side)


def test_check_stops_between_batches():
    image = np.zeros((1, 2000, 2000), np.float32)
    calls = []

    def run(batch):
        calls.append(len(batch))
        return pointwise(batch)

    def check():
        if len(calls) >= 2:
            raise TimeoutError("deadline")

    with pytest.raises(TimeoutError):
        options = TilingOptions(tile=256, batch_size=2)
        list(predict_tiled(lambda y0, y1: image[:, y0:y1], 2000, 2000, run, options, check=check))
    assert len(calls) == 2


@pytest.mark.parametrize("shape", [(1, 30_000), (30_000, 1), (10, 9_000)])
def test_seg_predict_thin_real_images(tmp_path, shape):
    """`seg predict` with the bundled model on thin strips of a real EM slice: a whole mask of that shape."""
    from PIL import Image
    from typer.testing import CliRunner

    from seg.cli import app
    from seg.io.images import read_image, read_mask

    from conftest import SAMPLES

    em = read_image(SAMPLES / "isbi_test_00.png")
    thin, long = min(shape), max(shape)
    strip = np.concatenate([em[y : y + thin] for y in range(0, 512 - thin + 1, thin)], axis=1)[:, :long]
    strip = np.tile(strip, (1, -(-long // strip.shape[1])))[:, :long]
    Image.fromarray(np.ascontiguousarray(strip if shape[0] == thin else strip.T)).save(tmp_path / "thin.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "thin.png"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    mask = read_mask(tmp_path / "out" / "thin.png")
    assert mask.shape == shape
    assert 0.05 < (mask == 0).mean() < 0.6  # membranes found along the strip, not one class everywhere


# -- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "words"),
    [({"tile": MIN_TILE - 1}, "tile"), ({"tile": MAX_TILE + 1}, "tile"), ({"tile": 64.0}, "tile"),
     ({"overlap": 1.0}, "overlap"), ({"overlap": -0.1}, "overlap"), ({"batch_size": 0}, "batch size"),
     ({"blend": "median"}, "blend")],
)  # fmt: skip
def test_options_are_checked_once_with_one_set_of_limits(changes, words):
    with pytest.raises(SegError, match=words):
        TilingOptions(**changes)
    with pytest.raises(SegError, match=words):  # a copy with changes is checked too
        TilingOptions().replace(**changes)


def test_options_replace_keeps_what_is_not_given():
    options = TilingOptions(tile=256, overlap=0.5, batch_size=2, tta=True)
    assert options.replace(tile=None, overlap=None) == options
    assert options.replace(tile=MIN_TILE) == TilingOptions(tile=MIN_TILE, overlap=0.5, batch_size=2, tta=True)


def test_config_and_options_share_their_limits(tmp_path):
    from seg.config import validate_config
    from seg.errors import ConfigError

    (tmp_path / "data").mkdir()
    raw = {"data": {"root": str(tmp_path / "data")}, "output": {"tile_size": MIN_TILE}}
    assert validate_config(raw).output.tile_size == MIN_TILE
    raw["output"]["tile_size"] = MIN_TILE - 1
    with pytest.raises(ConfigError, match="output.tile_size"):
        validate_config(raw)


# -- test-time augmentation ----------------------------------------------------------------------------
def by_row(batch: np.ndarray) -> np.ndarray:
    """A model whose logits depend on the row within the tile as well as on the pixel."""
    rows = np.linspace(-1.0, 1.0, batch.shape[2], dtype=np.float32)[None, None, :, None]
    x = batch[:, :1]
    return np.concatenate([x * (1.0 + rows), 1.0 - x + 3.0 * rows**2], axis=1)  # flips keep the even term


def tiled(image: np.ndarray, run, **options) -> np.ndarray:
    bands = predict_tiled(lambda y0, y1: image[:, y0:y1], *image.shape[1:], run, TilingOptions(**options))
    return np.concatenate([p for _, p in bands], axis=1)


def em_crop(height: int, width: int) -> np.ndarray:
    from seg.io.images import read_image

    from conftest import SAMPLES

    em = read_image(SAMPLES / "isbi_test_00.png").astype(np.float32) / 255.0
    return np.ascontiguousarray(np.tile(em, (-(-height // 512), -(-width // 512)))[None, :height, :width])


def test_tta_levels_and_the_old_bools():
    assert TilingOptions().tta == "none"
    assert [TilingOptions(tta=tta).tta for tta in (True, False, "d4")] == ["flips", "none", "d4"]
    assert TilingOptions(tta="flips").replace(tta=False).tta == "none"
    for bad in ("D4", "rot90", "", 1, None):
        with pytest.raises(SegError, match="tta .*: choose none, flips or d4"):
            TilingOptions(tta=bad)


@pytest.mark.parametrize("shape", [(200, 300), (20, 3000)])  # the thin image has 64 x 1024 tiles
@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_of_a_pointwise_model_is_exactly_no_tta(shape, tta):
    image = em_crop(*shape)
    expected = tiled(image, pointwise, tile=256)
    np.testing.assert_array_equal(tiled(image, pointwise, tile=256, tta=tta), expected)


def test_d4_differs_from_flips_and_commutes_with_rotation():
    image = em_crop(128, 192)  # with tile 64 and overlap 0.5 the tile grid is its own mirror image
    options = {"tile": 64, "overlap": 0.5, "batch_size": 3}
    d4 = tiled(image, by_row, tta="d4", **options)
    flips = tiled(image, by_row, tta="flips", **options)
    assert np.abs(d4 - flips).max() > 0.05
    for k in (1, 2, 3):
        turned = tiled(np.ascontiguousarray(np.rot90(image, k, axes=(1, 2))), by_row, tta="d4", **options)
        np.testing.assert_allclose(turned, np.rot90(d4, k, axes=(1, 2)), atol=1e-6)
    # Flips alone do not commute with a rotation by 90 degrees for this model.
    turned = tiled(np.ascontiguousarray(np.rot90(image, 1, axes=(1, 2))), by_row, tta="flips", **options)
    assert np.abs(turned - np.rot90(flips, 1, axes=(1, 2))).max() > 0.05


def test_an_image_that_fits_one_batch_is_one_tile():
    """A 512 x 512 image with its reflected margin is 640 x 640: one call of the model on it, not four 512
    tiles (2.6 times the pixels); the same answer for a model that sees one pixel at a time."""
    rng = np.random.default_rng(2)
    image = rng.random((1, 512, 512), dtype=np.float32)
    shapes = []

    def model(batch):
        shapes.append(batch.shape)
        return pointwise(batch)

    for batch_size, expected in ((4, [(1, 1, 640, 640)]), (1, [(1, 1, 512, 512)] * 4)):
        shapes.clear()
        options = TilingOptions(tile=512, batch_size=batch_size)
        got = np.concatenate([p for _, p in predict_tiled(lambda y0, y1: image[:, y0:y1], 512, 512, model, options)], 1)
        assert shapes == expected
        np.testing.assert_allclose(got, softmax(pointwise(image[None]))[0], atol=1e-5)
    grid = tile_grid(900, 900, 512, 0.25, 32, batch_size=4)  # 1056 x 1056 with its margin: more than 4 tiles
    assert grid.tiles == 9 and grid.tile_y == grid.tile_x == 512
