"""The ONNX predictor: seamless tiles, parity with PyTorch, every image kind, band-by-band files with
bounded memory, devices and errors."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from seg.errors import ImageError, SegError
from seg.inference.predictor import Predictor
from seg.inference.runtime import cuda_usable
from seg.inference.tiling import TilingOptions, softmax, tile_grid
from seg.io.images import decode_image, overlay, read_image, read_mask
from seg.io.sources import SAMPLE_PIXELS, ArraySource, TiffSource, open_image
from seg.io.tiff import tiff_layout
from seg.io.writers import output_is_whole


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB test picture (gradients plus noise), uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return (base + rng.integers(0, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)


# -- the inference path --------------------------------------------------------------------------------
def test_inference_path_does_not_import_torch():
    code = "import sys, seg.inference.predictor, seg.inference.runtime, seg.jobs.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tiled_mask_is_seamless_on_1024(unet_onnx, em_mosaic):
    """Tiles of 256 with 25% overlap against one pass over the whole 1024x1024 image (both with the same
    reflected border, so only the tiling differs)."""
    tiled = Predictor.from_onnx(unet_onnx, device="cpu", options=TilingOptions(tile=256, overlap=0.25))
    margin = tile_grid(1024, 1024, 256, 0.25, 32).margin
    x = tiled._row_reader(ArraySource(em_mosaic))(0, 1024)
    padded = np.pad(x, ((0, 0), (margin, margin), (margin, margin)), mode="reflect")
    whole = softmax(tiled.run(padded[None]))[0, :, margin:-margin, margin:-margin].argmax(0)

    mask = tiled.predict(em_mosaic).mask

    assert 0.1 < mask.mean() < 0.9  # both classes present: the comparison means something
    agreement = (mask == whole).mean()
    assert agreement >= 0.995, agreement


def test_matches_the_pytorch_predictor(unet_onnx, unet_checkpoint, em_image):
    from training.torch_runner import checkpoint_predictor

    image = em_image[:200, :300]  # small: PyTorch eager is slow on the CPU
    torch_model = checkpoint_predictor(unet_checkpoint, device="cpu")
    expected = torch_model.predict(image, probabilities=True).probabilities

    onnx_model = Predictor.from_onnx(unet_onnx, device="cpu")
    got = onnx_model.predict(image, probabilities=True, confidence=True)

    # One description: the checkpoint's and its export's differ only in what the export adds.
    added = {"version", "opset"}
    assert torch_model.info.model_dump(exclude=added) == onnx_model.info.model_dump(exclude=added)
    assert torch_model.options == onnx_model.options
    assert np.abs(got.probabilities - expected).max() < 1e-3
    assert (got.mask == expected.argmax(0)).mean() > 0.999
    np.testing.assert_allclose(got.confidence, got.probabilities.max(0))
    assert got.mask.dtype == np.uint8 and got.seconds > 0


def test_any_runner_behind_the_one_predictor(em_image):
    """`Predictor` takes any function from tiles to logits: a pointwise one gives its per-pixel answer."""
    from seg.inference.modelinfo import ModelInfo

    info = ModelInfo(classes=["dark", "bright"], in_channels=1, tile_size=128)  # fixed: (v / 255 - 0.5) / 0.25
    predictor = Predictor(lambda batch: np.concatenate([-batch, batch], axis=1), info)
    assert predictor.options == TilingOptions(tile=128)
    assert np.array_equal(predictor.predict(em_image).mask, (em_image >= 128).astype(np.uint8))


# -- image kinds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 1001), (300, 47), (513, 257)])
def test_any_size_gives_a_mask_of_that_size(conv_onnx, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = Predictor.from_onnx(conv_onnx, device="cpu").predict(image, probabilities=True)
    assert result.mask.shape == shape
    assert result.probabilities.shape == (2, *shape)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)


def test_16_bit_and_8_bit_give_the_same_mask(conv_onnx, em_image, tmp_path):
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    tifffile.imwrite(tmp_path / "em16.tif", em_image.astype(np.uint16) * 257)
    eight = predictor.predict(em_image).mask
    predictor.predict_file(tmp_path / "em16.tif", tmp_path / "mask.png")
    assert (read_mask(tmp_path / "mask.png") == eight).mean() > 0.999


def test_channels_are_converted_per_metadata(conv_onnx_factory, tmp_path):
    rgb_model = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu")
    grey_model = Predictor.from_onnx(conv_onnx_factory(in_channels=1), device="cpu")
    rgb = _rgb(40, 60)
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")

    # RGBA PNG into an RGB model: the alpha channel is dropped.
    rgb_model.predict_file(tmp_path / "rgba.png", tmp_path / "rgba_mask.png")
    assert np.array_equal(read_mask(tmp_path / "rgba_mask.png"), rgb_model.predict(rgb).mask)
    # Grey into an RGB model (repeated) and RGB into a grey model (luminance) both work.
    assert rgb_model.predict(rgb[..., 0]).mask.shape == (40, 60)
    assert grey_model.predict(rgb).mask.shape == (40, 60)


@pytest.mark.parametrize("planar", [False, True])
def test_multichannel_tiff(conv_onnx_factory, tmp_path, planar):
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=5, classes=3), device="cpu")
    image = np.random.default_rng(1).integers(0, 4096, (70, 90, 5), dtype=np.uint16)
    stored = np.moveaxis(image, -1, 0) if planar else image
    planes = {"planarconfig": "separate"} if planar else {}  # one page of 5 planes, not a stack of 5 pages
    tifffile.imwrite(tmp_path / "multi.tif", stored, photometric="minisblack", rowsperstrip=16, **planes)

    summary = predictor.predict_file(tmp_path / "multi.tif", tmp_path / "multi_mask.tif")

    assert summary["channels"] == 5 and summary["dtype"] == "uint16"
    assert np.array_equal(tifffile.imread(tmp_path / "multi_mask.tif"), predictor.predict(image).mask)
    rgb_model = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu")
    with pytest.raises(ImageError, match="multi.tif.*5 channels"):
        rgb_model.predict_file(tmp_path / "multi.tif", tmp_path / "x.png")


def test_percentile_normalisation_same_in_memory_and_from_file(conv_onnx_factory, tmp_path):
    norm = {"mode": "percentile", "low": 1.0, "high": 99.0, "mean": [0.5], "std": [0.25]}
    predictor = Predictor.from_onnx(conv_onnx_factory(normalize=norm), device="cpu")
    image = (np.random.default_rng(2).normal(1000, 200, (300, 400))).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", image, rowsperstrip=32, compression="zlib")
    tifffile.imwrite(tmp_path / "p_plain.tif", image)
    expected = predictor.predict(image).mask
    for name in ("p.tif", "p_plain.tif"):
        predictor.predict_file(tmp_path / name, tmp_path / f"{name}.mask.tif")
        assert np.array_equal(tifffile.imread(tmp_path / f"{name}.mask.tif"), expected), name


def test_auto_normalisation_is_fixed_for_8_bit_and_percentile_for_16_bit(conv_onnx_factory, tmp_path, em_image):
    """The template's mode: 8-bit images keep their absolute brightness, 16-bit ones are stretched."""
    base = {"low": 1.0, "high": 99.0, "mean": [0.5], "std": [0.25]}
    models = {mode: Predictor.from_onnx(conv_onnx_factory(normalize={"mode": mode, **base}), device="cpu")
              for mode in ("auto", "fixed", "percentile")}  # fmt: skip
    dim16 = (em_image.astype(np.uint16) * 4 + 1000)  # a 12-bit camera's range inside 16 bits
    probs = {(mode, name): m.predict(img, probabilities=True).probabilities
             for mode, m in models.items() for name, img in (("8", em_image), ("16", dim16))}  # fmt: skip
    np.testing.assert_array_equal(probs["auto", "8"], probs["fixed", "8"])
    np.testing.assert_array_equal(probs["auto", "16"], probs["percentile", "16"])
    assert not np.allclose(probs["auto", "16"], probs["fixed", "16"], atol=1e-3)
    tifffile.imwrite(tmp_path / "dim.tif", dim16, rowsperstrip=16)
    models["auto"].predict_file(tmp_path / "dim.tif", tmp_path / "dim_mask.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "dim_mask.tif"), models["auto"].predict(dim16).mask)


def test_flip_tta_runs_four_flips_per_tile(conv_onnx, em_image):
    calls = {"plain": 0, "tta": 0}
    for mode in calls:
        predictor = Predictor.from_onnx(conv_onnx, device="cpu", options=TilingOptions(tta=mode == "tta"))
        bare = predictor.run

        def counting(batch, bare=bare, mode=mode):
            calls[mode] += 1
            return bare(batch)

        predictor.run = counting
        result = predictor.predict(em_image, probabilities=True)
        np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert calls["tta"] == 4 * calls["plain"] > 0


# -- files, band by band -------------------------------------------------------------------------------
def test_big_striped_tiff_memory_does_not_grow_with_height(conv_onnx_factory, tmp_path):
    """27000 rows cost no more memory than 9000 rows of the same width: nothing holds the whole image.
    Both heights are above the percentile sample's cap (SAMPLE_PIXELS), which a smaller image stays under.
    (Correctness of the banded path is checked on every TIFF layout below.)"""
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu")
    assert 9000 * 500 > SAMPLE_PIXELS
    peaks = {}
    for height in (9000, 27000):
        path = tmp_path / f"big{height}.tif"
        tifffile.imwrite(path, _rgb(height, 500, seed=height), rowsperstrip=64, compression="zlib")
        tracemalloc.start()
        summary = predictor.predict_file(path, tmp_path / f"m{height}.tif", confidence_path=tmp_path / f"c{height}.tif")
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (summary["height"], summary["width"]) == (height, 500)
        assert tifffile.imread(tmp_path / f"m{height}.tif").shape == (height, 500)
    assert peaks[27000] < 1.2 * peaks[9000], peaks  # holding the extra 18000 rows (uint8) would add > 60%
    assert peaks[27000] < 0.25 * 27000 * 500 * 3 * 4, peaks  # a quarter of the normalised float32 image


@pytest.mark.parametrize(
    "layout",
    [
        {"rowsperstrip": 64, "compression": "zlib"},
        {"tile": (128, 128), "compression": "zlib"},
        {},  # uncompressed, one contiguous strip (tifffile's default)
        {"planarconfig": "separate"},
    ],
    ids=["striped", "tiled", "contiguous", "planar"],
)
def test_tiff_layouts_are_read_by_bands(conv_onnx_factory, tmp_path, layout, monkeypatch):
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu", options=TilingOptions(tile=128))
    rows_read: list[int] = []
    read = TiffSource.read
    monkeypatch.setattr(TiffSource, "read", lambda self, y0, y1: rows_read.append(y1 - y0) or read(self, y0, y1))
    image = _rgb(700, 300)
    stored = np.moveaxis(image, -1, 0) if layout.get("planarconfig") == "separate" else image
    tifffile.imwrite(tmp_path / "in.tif", stored, photometric="rgb", **layout)

    predictor.predict_file(tmp_path / "in.tif", tmp_path / "mask.tif")

    assert max(rows_read) <= predictor.options.tile  # never more than one tile row (overlap included) at once
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), predictor.predict(image).mask)


def test_written_files_are_tiled_tiffs_and_palette_pngs(conv_onnx, em_image, tmp_path):
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    summary = predictor.predict_file(
        _save_png(em_image, tmp_path / "em.png"),
        tmp_path / "mask.tif", probabilities_path=tmp_path / "p.tif", confidence_path=tmp_path / "c.tif",
        overlay_path=tmp_path / "o.png",
    )  # fmt: skip
    expected = predictor.predict(em_image, probabilities=True, confidence=True)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        page = tif.pages.first
        assert page.is_tiled and page.compression == 8 and page.dtype == np.uint8  # 8: zlib/deflate
        assert np.array_equal(page.asarray(), expected.mask)
    probs = tifffile.imread(tmp_path / "p.tif")
    assert probs.shape == (512, 512, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.transpose(2, 0, 1), expected.probabilities, atol=1e-6)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "c.tif"), expected.confidence, atol=1e-6)
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "RGB" and im.size == (512, 512)
    assert summary["pixels_per_class"] == expected.pixels_per_class(predictor.info.classes)
    assert sum(summary["pixels_per_class"].values()) == 512 * 512

    predictor.predict_file(tmp_path / "em.png", tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as im:
        assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert np.array_equal(np.asarray(im), expected.mask)


def test_banded_overlay_of_a_16_bit_image_is_the_whole_image_overlay(conv_onnx_factory, tmp_path):
    """The file path stretches every band by one range: the picture equals `seg.io.images.overlay` of the
    whole image (what the service's /overlay and the training report draw)."""
    predictor = Predictor.from_onnx(conv_onnx_factory(in_channels=3), device="cpu", options=TilingOptions(tile=128))
    image = (_rgb(700, 300).astype(np.uint16) * 200 + 1000).astype(np.uint16)
    alpha = np.full((700, 300, 1), 65535, np.uint16)  # an alpha channel must not widen the range
    tifffile.imwrite(tmp_path / "in.tif", np.concatenate([image, alpha], axis=2), rowsperstrip=64, photometric="rgb",
                     extrasamples=["unassalpha"])  # fmt: skip
    predictor.predict_file(tmp_path / "in.tif", tmp_path / "mask.tif", overlay_path=tmp_path / "o.png")
    expected = overlay(image, predictor.predict(image).mask, predictor.info.palette)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), expected)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [((80, 96), (80, 96, 1)), ((80, 96, 3), (80, 96, 3)), ((2, 80, 96), (80, 96, 2)), ((1, 80, 96, 4), (80, 96, 4))],
    ids=["grey", "rgb", "channel-first", "one-page-stack"],
)
def test_tiff_layouts_read_alike_whole_and_by_bands(tmp_path, stored, expected):
    """File, bytes and band reader share one layout rule (`seg.io.tiff.tiff_layout`)."""
    data = np.random.default_rng(0).integers(0, 60000, stored).astype(np.uint16)
    planes = {"planarconfig": "separate"} if stored[0] == 2 else {}  # channel-first: one page of planes
    tifffile.imwrite(tmp_path / "in.tif", data, photometric="minisblack", **planes)
    with tifffile.TiffFile(tmp_path / "in.tif") as tif:
        assert tiff_layout(tif.series[0].shape, tif.series[0].axes).image_shape == expected
    whole = read_image(tmp_path / "in.tif")
    decoded = decode_image((tmp_path / "in.tif").read_bytes())
    with TiffSource(tmp_path / "in.tif") as source:
        assert (source.height, source.width, source.channels) == expected
        bands = np.concatenate([source.read(y, y + 32) for y in range(0, source.height, 32)])
    for array in (whole, decoded):
        assert np.array_equal(array.reshape(expected), bands)


def _save_png(image: np.ndarray, path):
    Image.fromarray(image).save(path)
    return path


def test_more_than_256_classes_give_16_bit_masks(conv_onnx_factory, tmp_path):
    predictor = Predictor.from_onnx(conv_onnx_factory(classes=300), device="cpu", options=TilingOptions(tile=64))
    image = np.random.default_rng(3).integers(0, 256, (50, 70), dtype=np.uint8)
    expected = predictor.predict(image).mask
    assert expected.dtype == np.uint16
    _save_png(image, tmp_path / "i.png")
    predictor.predict_file(tmp_path / "i.png", tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), expected)


def test_png_past_pillows_bomb_limit_is_decoded(conv_onnx, em_image, tmp_path, monkeypatch):
    _save_png(em_image, tmp_path / "em.png")
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 512 x 512 is now a "bomb" for Pillow
        predictor.predict_file(tmp_path / "em.png", tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), predictor.predict(em_image).mask)


# -- errors --------------------------------------------------------------------------------------------
def test_corrupt_and_truncated_files_are_image_errors_and_leave_nothing(conv_onnx, em_image, tmp_path):
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    (tmp_path / "in").mkdir()
    good = _save_png(em_image, tmp_path / "in" / "good.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "in" / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    tifffile.imwrite(tmp_path / "in" / "cut.tif", _rgb(600, 500), rowsperstrip=16, compression="zlib")
    data = (tmp_path / "in" / "cut.tif").read_bytes()
    (tmp_path / "in" / "cut.tif").write_bytes(data[: len(data) // 2])
    for name in ("cut.png", "noise.png", "cut.tif"):
        with pytest.raises(ImageError, match=name):
            predictor.predict_file(tmp_path / "in" / name, tmp_path / "out" / f"{name}.png")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")


def test_output_is_whole_rejects_partial_files(conv_onnx, em_image, tmp_path):
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    _save_png(em_image, tmp_path / "em.png")
    for suffix in ("png", "tif"):
        out = tmp_path / f"m.{suffix}"
        predictor.predict_file(tmp_path / "em.png", out)
        assert output_is_whole(out, 512, 512)
        assert not output_is_whole(out, 512, 511)
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(out.read_bytes()[:-20])
        assert not output_is_whole(cut, 512, 512)


def test_device_and_option_errors(conv_onnx, tmp_path):
    assert Predictor.from_onnx(conv_onnx, device="auto").provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert Predictor.from_onnx(conv_onnx, device="cpu").device == "cpu"
    with pytest.raises(SegError, match="--device"):
        Predictor.from_onnx(conv_onnx, device="tpu")
    if not cuda_usable():
        with pytest.raises(SegError, match="no CUDA GPU"):
            Predictor.from_onnx(conv_onnx, device="cuda")
    with pytest.raises(SegError, match="overlap"):
        TilingOptions(overlap=1.0)
    with pytest.raises(SegError, match="no such ONNX model"):
        Predictor.from_onnx(tmp_path / "none.onnx")


def test_onnx_without_seg_metadata_is_refused(conv_onnx, tmp_path):
    import onnx

    model = onnx.load(str(conv_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(SegError, match="foreign.onnx.*no seg metadata"):
        Predictor.from_onnx(tmp_path / "foreign.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(unet_onnx, em_image):
    gpu = Predictor.from_onnx(unet_onnx, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    a = gpu.predict(em_image, probabilities=True).probabilities
    b = Predictor.from_onnx(unet_onnx, device="cpu").predict(em_image, probabilities=True).probabilities
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU")
def test_cuda_uses_io_binding_and_a_batch_for_its_memory(unet_onnx, em_image):
    from seg.inference.runtime import BoundRunner, gpu_batch_size

    gpu = Predictor.from_onnx(unet_onnx, device="cuda")
    assert isinstance(gpu.run, BoundRunner) and gpu.run.device == "cuda"
    assert gpu.options.batch_size == (gpu_batch_size(gpu.info.tile_size) or 4)
    assert gpu.predict(em_image).mask.shape == em_image.shape[:2]


def test_io_binding_runner_matches_session_run(unet_onnx, em_image):
    """The I/O-bound runner (what CUDA uses) on the CPU provider: the same logits as `session.run`, its
    device buffers kept while the batch shape stays and bound anew when it changes."""
    from seg.inference.runtime import BoundRunner, create_session, onnx_runner

    session, _ = create_session(unet_onnx, device="cpu")
    plain, bound = onnx_runner(session, bound=False), onnx_runner(session, bound=True)
    assert isinstance(bound, BoundRunner)
    rng = np.random.default_rng(0)
    first = None
    for shape in ((2, 1, 64, 96), (2, 1, 64, 96), (1, 1, 128, 64)):
        batch = rng.normal(0, 1, shape).astype(np.float32)
        np.testing.assert_allclose(bound(batch), plain(batch), atol=1e-6)
        first = first or bound.input
        assert (bound.input is first) == (shape == (2, 1, 64, 96))
    a = Predictor(bound, Predictor.from_onnx(unet_onnx, device="cpu").info).predict(em_image, probabilities=True)
    b = Predictor.from_onnx(unet_onnx, device="cpu").predict(em_image, probabilities=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_gpu_batch_size_follows_free_memory():
    from seg.inference.runtime import gpu_batch_size

    gib = 1 << 30
    assert gpu_batch_size(512, free=80 * gib) == 32  # capped
    assert gpu_batch_size(512, free=8 * gib) == 16  # half of 8 GiB at 256 MiB per 512² tile
    assert gpu_batch_size(1024, free=8 * gib) == 4
    assert gpu_batch_size(512, free=100 << 20) == 1
