"""The smp loop a user would write: U-Net, Adam 1e-3, cross-entropy, random crops and flips, batch 8.

Trains on every image of TRAIN (images/ and masks/ matched by stem; PNG, JPEG or TIFF, 8- or 16-bit),
predicts the whole images of TEST (padded to a multiple of 32) and writes the same metrics as `seg eval`
(seg.metrics) as JSON. Masks hold class indices, or 0/255 for two classes (read as 0/1). Images are
scaled to [0, 1]: by 255 for 8-bit, by each image's maximum otherwise, as a user who knows their
microscopy is 16-bit would. The seed sets the initialisation, the data order and the crops.

    python bench/bare_loop.py TRAIN TEST --classes 2 --in-channels 3 --steps 100 --seed 0 --out bare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seg.metrics import ConfusionMatrix  # noqa: E402

SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def read(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        return tifffile.imread(path)
    return np.asarray(Image.open(path))


def load(folder: Path, channels: int, classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    masks = {p.stem: p for p in (folder / "masks").iterdir() if p.suffix.lower() in SUFFIXES}
    pairs = []
    for path in sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in SUFFIXES):
        image = read(path)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] != channels:
            image = np.repeat(image[..., :1], channels, -1) if channels == 3 else image[..., :channels].mean(-1, keepdims=True)
        scale = 255.0 if image.dtype == np.uint8 else max(float(image.max()), 1.0)
        image = (image / scale).astype(np.float32).transpose(2, 0, 1)
        mask = read(masks[path.stem]).astype(np.int64)
        if classes == 2 and mask.max() == 255:
            mask = (mask > 127).astype(np.int64)
        pairs.append((image, mask))
    return pairs


def batch(pairs, size: int, rng: np.random.Generator, n: int = 8):
    xs, ys = [], []
    for i in rng.integers(0, len(pairs), n):
        x, y = pairs[i]
        pad_h, pad_w = max(size - x.shape[1], 0), max(size - x.shape[2], 0)
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
            y = np.pad(y, ((0, pad_h), (0, pad_w)), mode="reflect")
        top, left = rng.integers(0, x.shape[1] - size + 1), rng.integers(0, x.shape[2] - size + 1)
        x, y = x[:, top : top + size, left : left + size], y[top : top + size, left : left + size]
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[::-1]
        xs.append(x.copy())
        ys.append(y.copy())
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def build(encoder: str, channels: int, classes: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = smp.Unet(encoder, encoder_weights=None, in_channels=channels, classes=classes).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y, ignore_index=255)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def run(train: Path, test: Path, classes: int, channels: int, steps: int, encoder: str = "resnet34",
        crop: int = 256, seed: int = 0, batch_size: int = 8) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model, optimizer = build(encoder, channels, classes, device)
    pairs = load(train, channels, classes)
    model.train()
    for _ in range(steps):
        x, y = (t.to(device) for t in batch(pairs, crop, rng, batch_size))
        loss = step(model, optimizer, x, y)
    train_seconds = time.perf_counter() - start
    model.eval()
    conf = ConfusionMatrix(classes, 255)
    with torch.no_grad():
        for x, y in load(test, channels, classes):
            h, w = x.shape[1:]
            x = F.pad(torch.from_numpy(x)[None].to(device), (0, -w % 32, 0, -h % 32), mode="reflect")
            conf.update(model(x)[0, :, :h, :w].argmax(0).cpu().numpy(), y)
    return {"steps": steps, "seed": seed, "train_seconds": round(train_seconds, 2), "loss": loss.item(),
            "predict_seconds": round(time.perf_counter() - start - train_seconds, 2), **conf.compute()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.train, args.test, args.classes, args.in_channels, args.steps, args.encoder, args.crop,
                 args.seed, args.batch_size)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
