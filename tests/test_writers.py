"""seg.io.writers: files written by row bands of any height equal the image, are renamed only when complete,
and `output_is_whole` tells a finished file from a cut one."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from seg.errors import SegError
from seg.io.writers import band_writer, output_is_whole, page_writer

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


@pytest.mark.parametrize("suffix", [".png", ".tif"])
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
