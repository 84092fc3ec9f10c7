"""The run's pictures from samples and a predict function: image | truth | prediction on real EM slices."""

from pathlib import Path

import numpy as np
from PIL import Image

from seg.config import DataConfig
from seg.data.samples import Sample, load_pair
from seg.io.images import colorize, to_display_rgb
from training.report import plot_metrics, write_overlays

ISBI = Path(__file__).resolve().parents[1] / "data" / "isbi2012" / "train"


def samples() -> list[Sample]:
    return [Sample(f"slice/{n}", ISBI / "images" / f"{n}.png", ISBI / "labels" / f"{n}.png") for n in ("00", "01")]


def test_overlays_show_the_image_its_truth_and_what_predict_gives(tmp_path):
    data = DataConfig(root=ISBI, masks="labels", in_channels=1, classes=["membrane", "cell"])
    seen = []

    def predict(image: np.ndarray) -> np.ndarray:
        seen.append(image.shape)
        return (image[..., 0] > image.mean()).astype(np.int64)

    write_overlays(samples(), data, predict, tmp_path / "overlays", count=1)
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == ["slice_00.png"]
    assert seen == [(512, 512, 1)]  # the image as read, one call per picture
    picture = np.asarray(Image.open(tmp_path / "overlays" / "slice_00.png"))
    raw, truth = load_pair(samples()[0], data)
    expected = [to_display_rgb(raw), colorize(truth, data.class_palette), colorize(predict(raw), data.class_palette)]
    assert np.array_equal(picture, np.concatenate(expected, axis=1))


def test_metrics_plot_is_a_png(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_miou": 0.4},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_miou": 0.5}]  # fmt: skip
    plot_metrics(history, tmp_path / "metrics.png")
    assert Image.open(tmp_path / "metrics.png").format == "PNG"
