"""Mutated real image files for the decoder fuzz: bit flips, truncations and wrong lengths in headers.

The seeds are crops of a real ISBI EM slice written as PNG, JPEG and TIFF (grey and RGB, 8 and 16 bit,
striped, tiled, compressed and not). Every mutant is a deterministic function of (seed file, index), so a
failure can be replayed from its name.

    .venv/bin/python tests/mutants.py --count 400 --out /tmp/mutants     # write a corpus of files
"""

from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "data" / "samples" / "isbi_test_00.png"
# What no error message about a mutant may hold: Python reprs and tracebacks.
REPRS = ("object at 0x", "Traceback", "<tifffile.", "<_io.", "<PIL.")


def seeds(side: int = 96) -> dict[str, bytes]:
    """Well-formed files of real EM content, by name (the suffix gives the format)."""
    import tifffile
    from PIL import Image

    em = np.asarray(Image.open(SLICE))[100 : 100 + side, 150 : 150 + side]
    rgb = np.dstack([em, np.roll(em, 5, axis=1), 255 - em])

    def pil(array: np.ndarray, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    def tiff(array: np.ndarray, **options) -> bytes:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, **options)
        return buffer.getvalue()

    return {
        "grey.png": pil(em, "PNG"),
        "rgb.png": pil(rgb, "PNG"),
        "grey16.png": pil(em.astype(np.uint16) * 257, "PNG"),
        "grey.jpg": pil(em, "JPEG", quality=90),
        "rgb.jpg": pil(rgb, "JPEG", quality=90),
        "progressive.jpg": pil(rgb, "JPEG", quality=85, progressive=True),
        "grey.tif": tiff(em),
        "rgb-zlib.tif": tiff(rgb, compression="zlib", photometric="rgb"),
        "grey16-tiled.tif": tiff(em.astype(np.uint16) * 257, tile=(32, 32), compression="zlib"),
        "grey-strips.tif": tiff(em, rowsperstrip=8, compression="packbits"),
    }


# -- mutations ---------------------------------------------------------------------------------------
def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def flip_header_bits(data: bytes, rng: np.random.Generator) -> bytes:
    """Bit flips in the first 256 bytes, where sizes, offsets and counts live."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(min(256, len(out))))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def wrong_length(data: bytes, rng: np.random.Generator) -> bytes:
    """A length field set to a wrong value: a PNG chunk's, a JPEG segment's, a TIFF strip's byte count
    or image size; a random 32-bit word elsewhere."""
    out = bytearray(data)
    fields = length_fields(data)
    value = int(rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(1 << 32))]))
    if not fields:
        i = int(rng.integers(max(1, len(out) - 4)))
        out[i : i + 4] = struct.pack(">I", value)
        return bytes(out)
    offset, size, order = fields[int(rng.integers(len(fields)))]
    out[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, order)
    return bytes(out)


def length_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, byte order) of the length and size fields of a PNG, JPEG or TIFF."""
    fields: list[tuple[int, int, str]] = []
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i + 8 <= len(data):
            (n,) = struct.unpack(">I", data[i : i + 4])
            fields.append((i, 4, "big"))
            if data[i + 4 : i + 8] == b"IHDR":
                fields += [(i + 8, 4, "big"), (i + 12, 4, "big")]  # width, height
            i += 12 + n
    elif data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] not in (0xD9, 0xDA):
            fields.append((i + 2, 2, "big"))
            if data[i + 1] in (0xC0, 0xC2):
                fields += [(i + 5, 2, "big"), (i + 7, 2, "big")]  # height, width
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        order = "little" if data[:2] == b"II" else "big"
        fmt = "<" if order == "little" else ">"
        (ifd,) = struct.unpack(fmt + "I", data[4:8])
        if ifd + 2 <= len(data):
            (count,) = struct.unpack(fmt + "H", data[ifd : ifd + 2])
            fields.append((ifd, 2, order))
            for k in range(count):
                entry = ifd + 2 + 12 * k
                if entry + 12 > len(data):
                    break
                tag, kind = struct.unpack(fmt + "HH", data[entry : entry + 4])
                fields.append((entry + 4, 4, order))  # the value count
                if tag in (256, 257, 273, 278, 279, 322, 323, 324, 325):  # sizes, offsets, byte counts
                    fields.append((entry + 8, 2 if kind == 3 else 4, order))
    return fields


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "flip": flip_bits, "header": flip_header_bits, "truncate": truncate, "length": wrong_length,
}  # fmt: skip


def mutants(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`count` (name, bytes) mutants, cycling over seed files and mutations; the name ends in the seed's
    suffix, so a file's format is still told by its name."""
    files = seeds()
    names = list(files)
    kinds = list(MUTATIONS)
    for i in range(count):
        name = names[i % len(names)]
        kind = kinds[(i // len(names)) % len(kinds)]
        rng = np.random.default_rng([seed, i])
        stem, suffix = name.rsplit(".", 1)
        yield f"{i:04d}-{kind}-{stem}.{suffix}", MUTATIONS[kind](files[name], rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in mutants(args.count, args.seed):
        (args.out / name).write_bytes(data)
    print(f"{args.count} mutants in {args.out}")


if __name__ == "__main__":
    main()
