"""`seg predict`: inputs (files, folders, globs), outputs beside their relative paths, overlays and extras,
the JSON summary, resuming, failures, a killed run, and option errors."""

from __future__ import annotations

import io
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from seg.cli import app
from seg.inference.runtime import cuda_usable
from seg.io.images import read_mask

from conftest import EM_IMAGES, SAMPLES
from helpers import seg_killed_while_writing, write_svs

runner = CliRunner()


def predict(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["predict", *map(str, args)])
    return result.exit_code, result.output


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def image_tree(tmp_path, em_image) -> Path:
    """in/a.png (real EM), in/sub/deeper/b.tif (16-bit), in/sub/c.png (RGBA), in/.hidden/h.png, in/notes.txt."""
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    shutil.copy(SAMPLES / "isbi_test_01.png", root / "a.png")
    tifffile.imwrite(root / "sub" / "deeper" / "b.tif", em_image[:300, :200].astype(np.uint16) * 257)
    rgba = np.dstack([em_image[:100, :150]] * 3 + [np.full((100, 150), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "c.png")
    shutil.copy(SAMPLES / "isbi_test_02.png", root / ".hidden" / "h.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_real_images_end_to_end(unet_onnx, tmp_path):
    """The exported U-Net on the three real EM samples: masks, overlays and a summary."""
    out = tmp_path / "out"
    code, output = predict(unet_onnx, SAMPLES, "--out", out, "--overlay")
    assert code == 0, output
    summary = summary_of(out)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (3, 0, 0)
    assert summary["provider"] == "CPUExecutionProvider" and summary["classes"] == ["membrane", "cell"]
    for entry in summary["images"]:
        stem = Path(entry["input"]).stem
        mask = read_mask(out / f"{stem}.png")
        assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 1}
        assert (entry["height"], entry["width"]) == (512, 512) and entry["seconds"] > 0
        counts = entry["pixels_per_class"]
        assert sum(counts.values()) == 512 * 512 and counts["cell"] == int(mask.sum())
        with Image.open(out / f"{stem}.overlay.png") as im:
            assert im.mode == "RGB" and im.size == (512, 512)


def test_folders_globs_and_files_keep_relative_paths(conv_onnx, image_tree, tmp_path):
    out = tmp_path / "out"
    glob_pattern = str(EM_IMAGES / "0[01].png")
    code, output = predict(conv_onnx, image_tree, glob_pattern, SAMPLES / "isbi_test_00.png", "--out", out)
    assert code == 0, output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        ["a.png", "sub/deeper/b.png", "sub/c.png", "00.png", "01.png", "isbi_test_00.png", "summary.json"]
    )
    assert read_mask(out / "sub" / "deeper" / "b.png").shape == (300, 200)
    assert read_mask(out / "sub" / "c.png").shape == (100, 150)
    assert "[1/6]" in output and "[6/6]" in output  # plain progress lines when not a terminal


def test_tif_format_and_extra_outputs(conv_onnx, image_tree, tmp_path):
    out = tmp_path / "out"
    code, output = predict(
        conv_onnx, image_tree / "sub", "--out", out, "--format", "tif", "--probabilities", "--confidence", "--overlay",
        "--tile", "64", "--overlap", "0.5", "--batch-size", "3", "--tta", "flips",
    )  # fmt: skip
    assert code == 0, output
    with tifffile.TiffFile(out / "deeper" / "b.tif") as tif:
        assert tif.pages.first.is_tiled and tif.pages.first.shape == (300, 200)
    probs = tifffile.imread(out / "deeper" / "b.probs.tif")
    assert probs.shape == (300, 200, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tifffile.imread(out / "deeper" / "b.confidence.tif"), probs.max(-1))
    assert (out / "deeper" / "b.overlay.png").is_file() and (out / "c.overlay.png").is_file()
    summary = summary_of(out)
    assert (summary["tile"], summary["overlap"], summary["batch_size"], summary["tta"]) == (64, 0.5, 3, "flips")


@pytest.mark.parametrize("size_tags", ["ome", "resolution"])
def test_ome_tiff_format_is_a_pyramid_with_the_inputs_pixel_size(conv_onnx, em_image, tmp_path, size_tags):
    import ome_types

    image = np.tile(em_image, (5, 5))[:2100, :1500]  # levels of 2100, 1050 and 525 rows
    folder = tmp_path / "in"
    folder.mkdir()
    if size_tags == "ome":
        tifffile.imwrite(folder / "slide.ome.tif", image, tile=(256, 256), compression="zlib",
                         metadata={"axes": "YX", "PhysicalSizeY": 0.35, "PhysicalSizeX": 0.35,
                                   "PhysicalSizeYUnit": "µm", "PhysicalSizeXUnit": "µm"})  # fmt: skip
    else:  # 1 / 0.35 µm = 28571.4 pixels per centimetre
        tifffile.imwrite(folder / "slide.ome.tif", image, resolution=(1e4 / 0.35, 1e4 / 0.35), resolutionunit="CENTIMETER")
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "ome", "--format", "ome-tiff", "--overlay")
    assert code == 0, output
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "tif", "--format", "tif")
    assert code == 0, output
    mask = tifffile.imread(tmp_path / "tif" / "slide.ome.tif")
    path = tmp_path / "ome" / "slide.ome.ome.tif"
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.ome.ome.tif", "slide.ome.overlay.png", "summary.json"]
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
        pixels = ome_types.from_xml(tif.ome_metadata).images[0].pixels
    assert [level.shape for level in levels] == [(2100, 1500), (1050, 750), (525, 375)]
    assert np.array_equal(levels[0], mask) and np.array_equal(levels[2], mask[::4, ::4])
    assert pixels.physical_size_x == pytest.approx(0.35) and pixels.physical_size_y == pytest.approx(0.35)
    assert summary_of(tmp_path / "ome")["format"] == "ome-tiff"

    code, output = predict(conv_onnx, folder, "--out", tmp_path / "ome", "--format", "ome-tiff")
    assert code == 0 and "1 skipped" in output  # a whole OME-TIFF counts as done


def test_ome_zarr_format_holds_the_image_and_the_mask_as_its_labels(conv_onnx, em_image, tmp_path):
    """Read back with ome-zarr-py's reader (as napari-ome-zarr does): a multiscale image, the mask as its
    label image with the classes and colours, the pixel size as the scale, level 0 = `--format tif`; the
    probabilities as a multiscale uint8 image of their own, level 0 = the probabilities TIFF x 255."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    from seg.io.images import read_mask

    rgb = np.stack([np.tile(em_image, (5, 3))[:2100, :1500]] * 3, -1)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "slide.tif", rgb, tile=(256, 256), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "zarr", "--format", "ome-zarr", "--probabilities")
    assert code == 0, output
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "tif", "--format", "tif", "--probabilities")
    mask, probs = read_mask(tmp_path / "tif" / "slide.tif"), tifffile.imread(tmp_path / "tif" / "slide.probs.tif")
    path = tmp_path / "zarr" / "slide.ome.zarr"
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.ome.zarr", "slide.probs.ome.zarr", "summary.json"]

    nodes = {node.zarr.path.removeprefix(str(path)).strip("/"): node for node in Reader(parse_url(str(path)))()}
    image, label = nodes[""], nodes["labels/mask"]
    assert Multiscales.matches(image.zarr) and Label.matches(label.zarr) and Labels.matches(nodes["labels"].zarr)
    assert [tuple(level.shape) for level in image.data] == [(3, 2100, 1500), (3, 1050, 750), (3, 525, 375)]
    assert np.array_equal(np.asarray(image.data[1]), rgb[::2, ::2].transpose(2, 0, 1))
    assert [tuple(level.shape) for level in label.data] == [(2100, 1500), (1050, 750), (525, 375)]
    assert np.array_equal(np.asarray(label.data[0]), mask) and np.array_equal(np.asarray(label.data[2]), mask[::4, ::4])
    assert 0 < mask.mean() < 1  # both classes: the comparison means something
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales[0] == [1.0, pytest.approx(0.5), pytest.approx(0.5)] and scales[2][1:] == [pytest.approx(2.0)] * 2
    colours = label.zarr.root_attrs["image-label"]["colors"]
    assert [c["label-value"] for c in colours] == [0, 1] and all(len(c["rgba"]) == 4 for c in colours)

    (node,) = Reader(parse_url(str(tmp_path / "zarr" / "slide.probs.ome.zarr")))()
    assert Multiscales.matches(node.zarr) and [tuple(level.shape) for level in node.data][:2] == [(2, 2100, 1500), (2, 1050, 750)]
    level0 = np.asarray(node.data[0])
    assert level0.dtype == np.uint8 and np.abs(level0 - probs.transpose(2, 0, 1) * 255).max() <= 0.5 + 1e-3
    assert np.array_equal(np.asarray(node.data[1]), level0[:, ::2, ::2])
    classes = list(summary_of(tmp_path / "tif")["images"][0]["pixels_per_class"])
    assert [c["label"] for c in node.zarr.root_attrs["omero"]["channels"]] == classes

    code, output = predict(conv_onnx, folder, "--out", tmp_path / "zarr", "--format", "ome-zarr", "--probabilities")
    assert code == 0 and "1 skipped" in output  # a finished OME-Zarr counts as done


def test_whole_slide_and_pyramidal_inputs_are_read_at_full_resolution(conv_onnx, em_image, tmp_path):
    """An Aperio SVS (a TIFF with its MPP in the description) found in a folder, and a pyramidal OME-TIFF
    (seg's own output) as input: both segmented at level 0, the pixel size carried into the OME-TIFF."""
    import ome_types

    rgb = np.stack([np.tile(em_image, (2, 2))[:600, :700]] * 3, -1)
    folder = tmp_path / "slides"
    folder.mkdir()
    aperio = "Aperio Image Library v12.0.15 \r\n700x600 [0,100 700x600] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(folder / "slide.svs") as tif:
        tif.write(rgb, tile=(256, 256), compression="zlib", description=aperio, photometric="rgb")
        tif.write(rgb[::4, ::4], description=aperio.replace("(256x256)", "-> 175x150"), photometric="rgb")  # thumbnail
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "a", "--format", "ome-tiff")
    assert code == 0 and "1 predicted" in output, output
    with tifffile.TiffFile(tmp_path / "a" / "slide.ome.tif") as tif:
        assert tif.series[0].shape == (600, 700)
        assert ome_types.from_xml(tif.ome_metadata).images[0].pixels.physical_size_x == pytest.approx(0.499)

    code, output = predict(conv_onnx, tmp_path / "a" / "slide.ome.tif", "--out", tmp_path / "b", "--format", "tif")
    assert code == 0, output
    assert tifffile.imread(tmp_path / "b" / "slide.ome.tif").shape == (600, 700)  # level 0, not a smaller level


def test_slides_are_read_through_openslide_and_without_it_as_tiffs(conv_onnx, em_mosaic, tmp_path, monkeypatch):
    """An SVS of 2500 x 1900 read through OpenSlide (1000 columns a read, so a band takes three) gives the
    mask of the same pixels as a plain TIFF, with its MPP; without OpenSlide it is read as a TIFF with the
    same result, and a MIRAX file names the extra to install."""
    import sys

    import openslide

    import seg.io.sources
    from seg.io.headers import image_size
    from seg.io.sources import SlideSource, open_image

    monkeypatch.setattr(seg.io.sources, "READ_COLUMNS", 1000)
    grey = np.tile(em_mosaic, (2, 3))[:1900, :2500]
    rgb = np.stack([grey, np.roll(grey, 7, 1), grey // 2 + 60], -1)
    (tmp_path / "in").mkdir()
    write_svs(tmp_path / "in" / "slide.svs", rgb)
    tifffile.imwrite(tmp_path / "plain.tif", rgb)
    assert openslide.OpenSlide.detect_format(str(tmp_path / "in" / "slide.svs")) == "aperio"
    with open_image(tmp_path / "in" / "slide.svs") as source:
        assert isinstance(source, SlideSource) and (source.height, source.width) == (1900, 2500)
        assert np.array_equal(source.read(1000, 1500), rgb[1000:1500]) and source.pixel_size == (0.499, 0.499)

    assert predict(conv_onnx, tmp_path / "plain.tif", "--out", tmp_path / "plain")[0] == 0
    opened = []

    class Counted(openslide.OpenSlide):
        def __init__(self, filename):
            opened.append(filename)
            super().__init__(filename)

    monkeypatch.setattr(openslide, "OpenSlide", Counted)
    code, output = predict(conv_onnx, tmp_path / "in", "--out", tmp_path / "slide", "--format", "ome-tiff")
    assert code == 0 and "1 predicted" in output, output
    assert len(opened) == 1  # to read it: its format and size were read once, by open_image above
    write_svs(tmp_path / "other.svs", rgb[:950])  # a slide replaced by another of the same name
    assert image_size(tmp_path / "other.svs") == (950, 2500)
    write_svs(tmp_path / "other.svs", rgb[:800, :1200])
    assert image_size(tmp_path / "other.svs") == (800, 1200)
    expected = np.asarray(Image.open(tmp_path / "plain" / "plain.png"))
    assert 0 < expected.mean() < 1  # both classes
    with tifffile.TiffFile(tmp_path / "slide" / "slide.ome.tif") as tif:
        assert np.array_equal(tif.series[0].asarray(), expected)
        assert '"0.499"' in tif.ome_metadata or 'PhysicalSizeX="0.499"' in tif.ome_metadata

    monkeypatch.setitem(sys.modules, "openslide", None)  # as if `seg[slide]` were not installed
    with open_image(tmp_path / "in" / "slide.svs") as source:
        assert not isinstance(source, SlideSource)
    code, output = predict(conv_onnx, tmp_path / "in" / "slide.svs", "--out", tmp_path / "tiff")
    assert code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "tiff" / "slide.png")), expected), output
    (tmp_path / "scan.mrxs").write_text("[GENERAL]\n")
    code, output = predict(conv_onnx, tmp_path / "scan.mrxs", "--out", tmp_path / "mrxs")
    assert code == 1 and "failed" in output and "pip install 'seg[slide]'" in output and "Traceback" not in output


def test_a_folder_run_takes_a_vms_slide_as_one_image_not_its_jpeg_tiles(conv_onnx, em_mosaic, tmp_path):
    folder = tmp_path / "in"
    (folder / "scan").mkdir(parents=True)
    for name in ("scan_0.jpg", "scan_1.jpg", "scan_map.jpg", "other.jpg"):
        Image.fromarray(em_mosaic[:256, :256]).save(folder / "scan" / name)
    (folder / "scan" / "scan.vms").write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=2\nNoJpegRows=1\n"
        "ImageFile=scan_0.jpg\nImageFile(1,0)=scan_1.jpg\nMapFile=scan_map.jpg\n"
    )  # fmt: skip
    code, output = predict(conv_onnx, folder, "--out", tmp_path / "out")
    assert "1 predicted" in output and "scan.vms" in output, output  # the fake slide itself fails to open
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["other.png"]


def test_a_slide_openslide_cannot_read_is_a_one_line_error(conv_onnx, tmp_path):
    (tmp_path / "scan.mrxs").write_text("[GENERAL]\nSLIDE_VERSION = 1.9\n")
    (tmp_path / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    for name in ("scan.mrxs", "broken.svs"):
        code, output = predict(conv_onnx, tmp_path / name, "--out", tmp_path / "out")
        assert code == 1 and f"failed {tmp_path / name}" in output and "Traceback" not in output, output
    assert not list((tmp_path / "out").glob("*.png"))


def test_geojson_format_gives_polygons_whose_area_is_the_masks_pixels(conv_onnx, image_tree, tmp_path, monkeypatch):
    from shapely.geometry import shape

    out = tmp_path / "out"
    code, output = predict(conv_onnx, image_tree / "a.png", "--out", out, "--format", "geojson", "--tile", "128")
    assert code == 0, output
    features = json.loads((out / "a.geojson").read_text())["features"]
    summary = summary_of(out)["images"][0]
    background, *classes = summary["pixels_per_class"].items()
    assert not [f for f in features if f["properties"]["classification"]["name"] == background[0]]
    for name, pixels in classes:
        polygons = [shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == name]
        assert all(p.is_valid for p in polygons) and sum(p.area for p in polygons) == pixels > 0
    code, output = predict(conv_onnx, image_tree / "a.png", "--out", out, "--format", "geojson", "--tile", "128")
    assert code == 0 and "1 skipped" in output

    import sys

    monkeypatch.setitem(sys.modules, "rasterio.features", None)  # as if `seg[geo]` were not installed
    code, output = predict(conv_onnx, image_tree / "a.png", "--out", tmp_path / "none", "--format", "geojson")
    assert code == 2 and "pip install 'seg[geo]'" in output and "Traceback" not in output
    assert not (tmp_path / "none" / "a.geojson").exists()


def test_rerun_skips_whole_outputs_and_redoes_partial_ones(conv_onnx, image_tree, tmp_path):
    out = tmp_path / "out"
    assert predict(conv_onnx, image_tree, "--out", out)[0] == 0
    first = summary_of(out)
    stamp = (out / "a.png").stat().st_mtime_ns
    # A killed run's leftovers: a temp file, and a mask cut short (as if written by something non-atomic).
    (out / ".a.x1y2.png.tmp").write_bytes(b"partial")
    cut = out / "sub" / "c.png"
    cut.write_bytes(cut.read_bytes()[:100])

    code, output = predict(conv_onnx, image_tree, "--out", out)

    assert code == 0, output
    entries = {Path(e["input"]).name: e for e in summary_of(out)["images"]}
    assert entries["a.png"]["status"] == "skipped" and entries["b.tif"]["status"] == "skipped"
    assert entries["c.png"]["status"] == "ok"
    assert read_mask(cut).shape == (100, 150)
    assert (out / "a.png").stat().st_mtime_ns == stamp
    # Skipped images keep their numbers from the earlier summary.
    old = {Path(e["input"]).name: e for e in first["images"]}
    assert entries["a.png"]["pixels_per_class"] == old["a.png"]["pixels_per_class"]

    code, output = predict(conv_onnx, image_tree, "--out", out, "--force")
    assert code == 0 and summary_of(out)["ok"] == 3
    assert (out / "a.png").stat().st_mtime_ns != stamp

    # Asking for an overlay later: the existing mask alone does not make the image done.
    predict(conv_onnx, image_tree, "--out", out, "--overlay")
    assert summary_of(out)["ok"] == 3 and (out / "a.overlay.png").is_file()


def test_output_folder_inside_the_input_folder_is_not_read_back(conv_onnx, image_tree):
    out = image_tree / "predictions"
    assert predict(conv_onnx, image_tree, "--out", out)[0] == 0
    assert predict(conv_onnx, image_tree, "--out", out)[0] == 0
    summary = summary_of(out)
    assert summary["skipped"] == 3 and not any("predictions" in e["input"] for e in summary["images"])


def test_unreadable_inputs_are_reported_skipped_and_exit_1(conv_onnx, image_tree, tmp_path):
    (image_tree / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (image_tree / "a.tif").write_bytes(b"II*\x00garbage")  # also collides with a.png's output
    out = tmp_path / "out"

    code, output = predict(conv_onnx, image_tree, tmp_path / "missing.png", "--out", out)

    assert code == 1
    summary = summary_of(out)
    assert summary["ok"] == 3 and summary["failed"] == 3
    errors = {Path(e["input"]).name: e["error"] for e in summary["images"] if e["status"] == "failed"}
    assert "broken.png" in errors["broken.png"] and "missing.png" in errors["missing.png"]
    assert "already that of" in errors["a.tif"] or "already that of" in errors["a.png"]
    assert "broken.png" in output and "3 failed" in output
    assert read_mask(out / "sub" / "c.png").shape == (100, 150)


def test_bundled_model_is_the_default(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.delenv("SEG_MODEL", raising=False)
    monkeypatch.setattr("seg.inference.runtime.BUNDLED_MODEL", tmp_path / "assets" / "model.onnx")
    code, output = predict(SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out")
    assert code == 2 and "bundled model" in output and "missing" in output

    monkeypatch.setattr("seg.inference.runtime.BUNDLED_MODEL", conv_onnx)
    code, output = predict(SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out")
    assert code == 0, output
    assert summary_of(tmp_path / "out")["model"] == str(conv_onnx)


def test_seg_model_variable_names_the_default(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_MODEL", str(tmp_path / "nowhere.onnx"))
    code, output = predict(SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out")
    assert code == 2 and "SEG_MODEL" in output and "nowhere.onnx" in output

    monkeypatch.setenv("SEG_MODEL", str(conv_onnx))
    code, output = predict(SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out")
    assert code == 0, output
    assert summary_of(tmp_path / "out")["model"] == str(conv_onnx)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--format", "jpg"], "--format"),
        (["--overlap", "1.5"], "overlap"),
        (["--device", "tpu"], "--device"),
        (["--batch-size", "0"], "batch size"),
        (["--tta", "d8"], "tta 'd8': choose none, flips or d4"),
    ],
)
def test_option_errors_exit_2(conv_onnx, tmp_path, options, message):
    code, output = predict(conv_onnx, SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out", *options)
    assert code == 2 and message in output


def test_tta_levels(conv_onnx, tmp_path):
    image = SAMPLES / "isbi_test_00.png"
    masks = {}
    for level in ("none", "flips", "d4"):
        code, output = predict(conv_onnx, image, "--out", tmp_path / level, "--tta", level)
        assert code == 0, output
        assert f"TTA {level};" in output
        summary = summary_of(tmp_path / level)
        assert summary["tta"] == summary["images"][0]["made_with"]["tta"] == level
        masks[level] = read_mask(tmp_path / level / "isbi_test_00.png")
    assert not np.array_equal(masks["flips"], masks["d4"])  # the 3x3 kernels are not rotation symmetric
    code, output = predict(conv_onnx, image, "--out", tmp_path / "bad", "--tta", "yes")
    assert code == 2 and output.strip() == "error: tta 'yes': choose none, flips or d4"
    assert not (tmp_path / "bad" / "isbi_test_00.png").exists()


@pytest.mark.skipif(cuda_usable(), reason="a GPU is usable here")
def test_cuda_without_gpu_is_a_clear_error(conv_onnx, tmp_path):
    code, output = predict(conv_onnx, SAMPLES / "isbi_test_00.png", "--out", tmp_path / "out", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in output


def test_output_folder_that_cannot_be_written_is_a_clear_error(conv_onnx, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, output = predict(conv_onnx, SAMPLES / "isbi_test_00.png", "--out", blocker / "out")
    assert code == 2 and "cannot write here" in output and "Traceback" not in output


def test_no_inputs_after_the_model(conv_onnx, tmp_path):
    code, output = predict(conv_onnx, "--out", tmp_path / "out")
    assert code == 2 and "no input images" in output


def test_killed_run_leaves_no_half_written_mask(conv_onnx, tmp_path):
    """Kill `seg predict` while it writes a big mask: no file under the final name; a rerun completes it."""
    rng = np.random.default_rng(0)
    big = tmp_path / "in" / "big.tif"
    big.parent.mkdir()
    tifffile.imwrite(big, rng.integers(0, 256, (6000, 2000), dtype=np.uint8), rowsperstrip=64, compression="zlib")
    out = tmp_path / "out"
    code = seg_killed_while_writing(".big.", "predict", conv_onnx, big, "--out", out, "--format", "tif")
    assert code == -signal.SIGKILL
    assert not (out / "big.tif").exists() and list(out.glob(".big.*"))  # a half-written temporary file only

    code, output = predict(conv_onnx, big, "--out", out, "--format", "tif")

    assert code == 0, output
    assert tifffile.imread(out / "big.tif").shape == (6000, 2000)


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_on_a_terminal(conv_onnx, tmp_path, monkeypatch, terminal):
    """On a terminal the run draws bars (images, and the tiles of a large image) and no counted lines;
    elsewhere it prints counted lines and no bar."""
    from seg.inference.predictor import Predictor
    from seg.jobs.batch import run_batch

    monkeypatch.delenv("CI", raising=False)
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((300, 3000), np.uint8))
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=terminal, width=100, color_system=None)
    predictor = Predictor.from_onnx(conv_onnx, device="cpu")
    summary = run_batch(predictor, [str(tmp_path / "wide.tif"), str(SAMPLES)], tmp_path / "out", console=console)
    text = stream.getvalue()
    assert summary["ok"] == 4
    drawn = "━" in text and "images" in text  # rich's bar and its label
    assert drawn is terminal
    assert ("tiles of wide.tif" in text) is terminal  # the large image's own bar
    assert ("[4/4] ok" in text) is not terminal


def test_summaries_of_the_boolean_tta_still_skip(conv_onnx, tmp_path):
    """A summary.json written when TTA was on or off (true/false) matches the levels flips and none."""
    out = tmp_path / "out"
    for level, old in (("none", False), ("flips", True)):
        assert predict(conv_onnx, SAMPLES / "isbi_test_00.png", "--out", out, "--tta", level)[0] == 0
        summary = summary_of(out)
        summary["images"][0]["made_with"]["tta"] = old
        (out / "summary.json").write_text(json.dumps(summary))
        code, output = predict(conv_onnx, SAMPLES / "isbi_test_00.png", "--out", out, "--tta", level)
        assert code == 0 and summary_of(out)["skipped"] == 1, output
