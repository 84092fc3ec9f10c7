"""The smp loop a user would write: U-Net, Adam 1e-3, cross-entropy, random crops and flips, batch 8.

Trains on every image of TRAIN (images/ and masks/ of class indices, 255 ignored), predicts the whole
images of TEST (padded to a multiple of 32) and writes the same metrics as `seg eval` as JSON.

    python bench/bare_loop.py TRAIN TEST --classes 3 --in-channels 3 --steps 100 --out bare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seg.metrics import ConfusionMatrix  # noqa: E402


def load(folder: Path, channels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for path in sorted((folder / "images").glob("*.png")):
        image = Image.open(path)
        image = np.asarray(image.convert("RGB") if channels == 3 else image)
        scale = 65535.0 if image.dtype == np.uint16 else 255.0
        image = (image.reshape(*image.shape[:2], -1) / scale).astype(np.float32).transpose(2, 0, 1)
        pairs.append((image, np.asarray(Image.open(folder / "masks" / path.name)).astype(np.int64)))
    return pairs


def batch(pairs, size: int, rng: np.random.Generator, n: int = 8):
    xs, ys = [], []
    for i in rng.integers(0, len(pairs), n):
        x, y = pairs[i]
        top, left = rng.integers(0, x.shape[1] - size + 1), rng.integers(0, x.shape[2] - size + 1)
        x, y = x[:, top : top + size, left : left + size], y[top : top + size, left : left + size]
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[::-1]
        xs.append(x.copy())
        ys.append(y.copy())
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def run(train: Path, test: Path, classes: int, channels: int, steps: int, encoder: str = "resnet34",
        crop: int = 256, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = smp.Unet(encoder, encoder_weights=None, in_channels=channels, classes=classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pairs = load(train, channels)
    model.train()
    for _ in range(steps):
        x, y = (t.to(device) for t in batch(pairs, crop, rng))
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    conf = ConfusionMatrix(classes, 255)
    with torch.no_grad():
        for x, y in load(test, channels):
            h, w = x.shape[1:]
            x = F.pad(torch.from_numpy(x)[None].to(device), (0, -w % 32, 0, -h % 32), mode="reflect")
            conf.update(model(x)[0, :, :h, :w].argmax(0).cpu().numpy(), y)
    return {"steps": steps, "train_seconds": round(train_seconds, 2), "loss": loss.item(),
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.train, args.test, args.classes, args.in_channels, args.steps, args.encoder, args.crop)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
