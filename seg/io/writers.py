"""Images written by row bands as a prediction finishes them: PNG, tiled TIFF, pyramidal OME-TIFF, OME-Zarr
and GeoJSON polygons (`band_writer`), multi-page TIFF stacks (`page_writer`), and the check that an earlier
output is whole (`output_is_whole`).

Every file is written into a temporary file beside its path and renamed onto it when complete.
"""

from __future__ import annotations

import os
import queue
import shutil
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from seg.errors import SegError
from seg.io.geojson import GeoJsonBandWriter, geojson_is_whole
from seg.io.headers import TIFF_SUFFIXES
from seg.io.headers import png_size
from seg.io.images import atomic_path
from seg.io.omezarr import OmeZarrBandWriter, OmeZarrProbabilitiesWriter
from seg.io.omezarr import is_whole as omezarr_is_whole
from seg.io.sources import round_up

WRITE_TILE = 256  # tile side of the TIFFs we write
FORMATS = {"png": "png", "tif": "tif", "ome-tiff": "ome.tif", "ome-zarr": "ome.zarr", "geojson": "geojson"}  # a mask's suffix


def write_tile(height: int, width: int) -> tuple[int, int]:
    """The tile shape of a TIFF we write: WRITE_TILE, or the image rounded up to 16 when smaller."""
    return min(WRITE_TILE, round_up(height, 16)), min(WRITE_TILE, round_up(width, 16))


class BandWriter:
    """Receives an image's rows top to bottom (`write`), then completes the file (`close`)."""

    def write(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


@contextmanager
def band_writer(
    path: str | Path, height: int, width: int, dtype: Any, samples: int = 1, palette: Sequence | None = None,
    pixel_size: tuple[float, float] | None = None, classes: Sequence[str] = (), source: Any = None,
) -> Iterator[BandWriter]:  # fmt: skip
    """A BandWriter into a temporary file beside `path`, renamed onto `path` when complete and removed on
    error: a PNG for .png, a pyramidal OME-TIFF for .ome.tif/.ome.tiff, a tiled zlib TIFF for .tif/.tiff, a
    mask's polygons for .geojson (`seg.io.geojson`), an OME-Zarr folder for .ome.zarr (`seg.io.omezarr`):
    the image and the mask when `source` is given, else the probabilities as a uint8 image.

    Args:
        path: the output file.
        height: image height.
        width: image width.
        dtype: uint8 or uint16 (PNG, TIFF) or float32 (TIFF only).
        samples: values per pixel (1 for a mask, 3 for RGB, K for probabilities).
        palette: RGB colours for a PNG mask (a palette PNG).
        pixel_size: (y, x) micrometres per pixel, for an OME-TIFF's metadata.
        classes: the class names, for GeoJSON features and OME-Zarr label properties.
        source: the `ImageSource` predicted, whose pixels an OME-Zarr mask holds beside it.
    """
    path, dtype = Path(path), np.dtype(dtype)
    suffix, folder = path.suffix.lower(), is_ome_zarr(path)
    if suffix not in (*TIFF_SUFFIXES, ".png", ".geojson") and not folder:
        raise SegError(f"{path}: write .png, .tif, .ome.zarr or .geojson, not {path.suffix!r}")
    with atomic_folder(path) if folder else atomic_path(path) as tmp:
        writer: BandWriter
        sizes = pyramid_sizes(height, width) if folder else []
        if folder and source is not None:
            writer = OmeZarrBandWriter(tmp, sizes, dtype, source, classes, palette, pixel_size)  # type: ignore[assignment]
        elif folder:
            writer = OmeZarrProbabilitiesWriter(tmp, sizes, samples, classes, pixel_size)  # type: ignore[assignment]
        elif suffix == ".png":
            writer = PngBandWriter(tmp, height, width, dtype, samples, palette)
        elif suffix == ".geojson":
            writer = GeoJsonBandWriter(tmp, height, width, classes, palette)  # type: ignore[assignment]
        elif is_ome_tiff(path):
            writer = OmeTiffBandWriter(tmp, height, width, dtype, samples, pixel_size)
        else:
            writer = TiffBandWriter(tmp, height, width, dtype, samples)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()


def is_ome_zarr(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(".ome.zarr")


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`, put in its place (an older one removed) when complete, else removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_ome_tiff(path: str | Path) -> bool:
    return Path(path).name.lower().endswith((".ome.tif", ".ome.tiff"))


@contextmanager
def page_writer(path: str | Path, size: int = 0) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends one page, (H, W) or (H, W, S), to a multi-page zlib TIFF written into a
    temporary file beside `path` and renamed onto it when complete (removed on error).

    Pages are striped (readable by ImageJ and Fiji as a stack) and carry no shape metadata, so tifffile
    reads them back as one (pages, H, W[, S]) series; BigTIFF when `size` (uncompressed bytes) passes 2 GB.
    """
    import tifffile

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=size > 2**31) as tif:

        def write(page: np.ndarray) -> None:
            rgb = page.ndim == 3 and page.shape[2] == 3 and page.dtype == np.uint8
            tif.write(
                page, compression="zlib", photometric="rgb" if rgb else "minisblack", metadata=None,
                planarconfig="contig" if page.ndim == 3 else None, rowsperstrip=64,
            )  # fmt: skip

        yield write


class PngBandWriter(BandWriter):
    """A PNG encoded as rows arrive (Pillow needs the whole image): IHDR, PLTE, zlib-streamed IDAT, IEND.

    Rows use PNG's "Sub" filter (difference to the pixel on the left), which suits masks and photos.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: np.dtype, samples: int = 1, palette=None):
        if dtype not in (np.uint8, np.uint16) or samples not in (1, 2, 3, 4):
            raise SegError(f"{path}: PNG holds 8/16-bit images with 1-4 channels, not {dtype} x {samples}")
        self.file = open(path, "wb")
        self.height, self.width, self.samples = height, width, samples
        self.dtype = np.dtype(">u2") if dtype == np.uint16 else np.dtype(np.uint8)
        self.rows = 0
        use_palette = palette is not None and samples == 1 and dtype == np.uint8
        colour = 3 if use_palette else {1: 0, 2: 4, 3: 2, 4: 6}[samples]
        self.file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * self.dtype.itemsize, colour, 0, 0, 0))
        if use_palette:
            colours = [int(v) for rgb in list(palette)[:256] for v in rgb[:3]]
            self._chunk(b"PLTE", bytes(colours))
        self.zip = zlib.compressobj(6)
        self.pending = b""

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.file.write(struct.pack(">I", len(data)) + kind + data)
        self.file.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def write(self, rows: np.ndarray) -> None:
        n = rows.shape[0]
        raw = np.ascontiguousarray(rows, dtype=self.dtype).view(np.uint8).reshape(n, -1)
        bpp = self.samples * self.dtype.itemsize
        filtered = np.empty((n, raw.shape[1] + 1), np.uint8)
        filtered[:, 0] = 1  # Sub
        filtered[:, 1 : 1 + bpp] = raw[:, :bpp]
        np.subtract(raw[:, bpp:], raw[:, :-bpp], out=filtered[:, 1 + bpp :])
        self.pending += self.zip.compress(filtered.tobytes())
        if len(self.pending) >= 1 << 20:
            self._chunk(b"IDAT", self.pending)
            self.pending = b""
        self.rows += n

    def close(self) -> None:
        try:
            if self.rows != self.height:
                raise RuntimeError(f"PNG got {self.rows} of {self.height} rows")
            self._chunk(b"IDAT", self.pending + self.zip.flush())
            self._chunk(b"IEND", b"")
        finally:
            self.file.close()

    def abort(self) -> None:
        self.file.close()


_END = object()


class TiffBandWriter(BandWriter):
    """A tiled, zlib-compressed TIFF written while rows arrive.

    tifffile writes a tiled image from an iterator of tiles in one call; that call runs in a thread that
    takes bands from a small queue, so the producer pushes rows and memory stays at a few bands.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: np.dtype, samples: int = 1, buffer: int = 4 << 20):
        self.height, self.width, self.samples, self.dtype = height, width, samples, np.dtype(dtype)
        self.buffer = buffer  # bytes of tiles tifffile takes at once (its default would read ahead 512 MB)
        self.tile = write_tile(height, width)
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), name="tiff-writer", daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        import tifffile

        shape = (self.height, self.width) if self.samples == 1 else (self.height, self.width, self.samples)
        photometric = "rgb" if self.samples == 3 and self.dtype == np.uint8 else "minisblack"
        try:
            tifffile.imwrite(
                path, data=self._tiles(), shape=shape, dtype=self.dtype, tile=self.tile,
                compression="zlib", photometric=photometric, planarconfig="contig" if self.samples > 1 else None,
                maxworkers=2, buffersize=self.buffer,
            )  # fmt: skip
        except BaseException as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        """Keep `err` for the producer's next write or close, and unblock it if it waits on a full queue."""
        self.error = err
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    def _tiles(self) -> Iterator[np.ndarray]:
        th, tw = self.tile
        pending: list[np.ndarray] = []
        have = done = 0
        while done < self.height:
            take = min(th, self.height - done)
            while have < take:
                rows = self.queue.get()
                if rows is _END:
                    raise RuntimeError(f"TIFF writer got {done + have} of {self.height} rows")
                pending.append(rows)
                have += rows.shape[0]
            band = pending[0] if len(pending) == 1 else np.concatenate(pending)
            rows, rest = band[:take], band[take:]
            pending, have = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
            for x in range(0, self.width, tw):
                yield rows[:, x : x + tw]  # tifffile pads edge tiles
            done += take

    def _put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise self.error or RuntimeError("TIFF writer stopped")

    def write(self, rows: np.ndarray) -> None:
        self._put(np.ascontiguousarray(rows, dtype=self.dtype))

    def close(self) -> None:
        if self.thread.is_alive():
            self._put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            try:
                self.queue.put(_END, timeout=5)
            except queue.Full:
                pass
        self.thread.join(timeout=10)


PYRAMID_SIDE = 1024  # an OME-TIFF's smallest level has its longest side at most this


def pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of each level: the image, then halved (every other pixel, so rounded up) until the
    longest side is at most PYRAMID_SIDE."""
    sizes = [(height, width)]
    while max(sizes[-1]) > PYRAMID_SIDE:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class OmeTiffBandWriter(TiffBandWriter):
    """A tiled, zlib-compressed, pyramidal OME-TIFF (sub-resolutions as SubIFDs, as QuPath, Fiji's
    Bio-Formats and napari read them), written while rows arrive.

    Each level takes every other row and column of the one above (a mask's classes stay classes). While
    rows arrive, the full level streams into the file and each smaller level into a tiled TIFF of its own
    beside it; when the last row is in, those are copied into the file's SubIFDs band by band and removed.
    Memory stays at a few bands of each level.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: np.dtype, samples: int = 1,
                 pixel_size: tuple[float, float] | None = None):  # fmt: skip
        self.sizes, self.pixel_size = pyramid_sizes(height, width), pixel_size
        self.level_paths = [path.with_name(f"{path.name}.level{i}") for i in range(1, len(self.sizes))]
        self.levels = [TiffBandWriter(p, h, w, dtype, samples, buffer=1 << 20)
                       for p, (h, w) in zip(self.level_paths, self.sizes[1:])]  # fmt: skip
        self.rows_in = [0] * len(self.levels)  # rows of the level above each smaller level, so far
        self.levels_done = threading.Event()
        super().__init__(path, height, width, dtype, samples)

    def _run(self, path: Path) -> None:
        import tifffile

        axes = "YX" if self.samples == 1 else "YXC"
        metadata: dict[str, Any] = {"axes": axes}
        if self.pixel_size:
            metadata.update(PhysicalSizeY=self.pixel_size[0], PhysicalSizeX=self.pixel_size[1],
                            PhysicalSizeYUnit="µm", PhysicalSizeXUnit="µm")  # fmt: skip
        options = dict(dtype=self.dtype, compression="zlib", photometric="minisblack",
                       planarconfig="contig" if self.samples > 1 else None, maxworkers=2, buffersize=self.buffer)  # fmt: skip
        try:
            with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
                tif.write(self._tiles(), shape=self._shape(0), tile=self.tile, subifds=len(self.levels),
                          metadata=metadata, **options)  # fmt: skip
                self.levels_done.wait()
                if self.error is not None:
                    return
                for level, level_path in enumerate(self.level_paths, 1):
                    tile = write_tile(*self.sizes[level])
                    tif.write(self._copied(level_path, tile), shape=self._shape(level), tile=tile, subfiletype=1,
                              metadata=None, **options)  # fmt: skip
        except BaseException as err:
            self._fail(err)

    def _shape(self, level: int) -> tuple[int, ...]:
        return self.sizes[level] + ((self.samples,) if self.samples > 1 else ())

    @staticmethod
    def _copied(path: Path, tile: tuple[int, int]) -> Iterator[np.ndarray]:
        """The tiles of the TIFF at `path`, row of tiles by row of tiles."""
        from seg.io.sources import TiffSource

        with TiffSource(path) as source:
            for y in range(0, source.height, tile[0]):
                rows = source.read(y, min(y + tile[0], source.height))
                rows = rows[..., 0] if rows.shape[-1] == 1 else rows
                for x in range(0, source.width, tile[1]):
                    yield rows[:, x : x + tile[1]]

    def write(self, rows: np.ndarray) -> None:
        super().write(rows)
        for level, writer in enumerate(self.levels):
            start = self.rows_in[level]
            self.rows_in[level] += rows.shape[0]
            rows = rows[(-start) % 2 :: 2, ::2]  # the rows of even index in the whole level
            if not rows.shape[0]:
                break
            writer.write(rows)

    def close(self) -> None:
        try:
            if self.thread.is_alive():
                self._put(_END)
            for writer in self.levels:
                writer.close()
        except BaseException:
            self.abort()
            raise
        self.levels_done.set()
        try:
            super().close()
        finally:
            self._remove_levels()

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        for writer in self.levels:
            writer.abort()
        self.levels_done.set()
        super().abort()
        self._remove_levels()

    def _remove_levels(self) -> None:
        for path in self.level_paths:
            path.unlink(missing_ok=True)


def output_is_whole(path: str | Path, height: int, width: int) -> bool:
    """True when `path` is a complete PNG, TIFF, GeoJSON or OME-Zarr of the given size (written by us, or
    otherwise whole)."""
    path = Path(path)
    if is_ome_zarr(path):
        return omezarr_is_whole(path, height, width)
    if not path.is_file():
        return False
    try:
        if path.suffix.lower() == ".geojson":  # written whole or not at all; its size is not in it
            return geojson_is_whole(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                size = os.path.getsize(path)
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                return page.shape[:2] == (height, width) and max(ends, default=0) <= size and all(page.databytecounts)
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
        return png_size(head) == (height, width) and tail[4:8] == b"IEND"
    except Exception:  # anything unreadable is not whole
        return False
